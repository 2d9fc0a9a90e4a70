package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/edge-relay/relay/internal/buildinfo"
)

// versionCommand prints relayctl's release and, unless --client, the
// release of the control node that answers (ClusterService.Status, which
// staff accounts may call): the check before and during an upgrade.
func (a *app) versionCommand() *cobra.Command {
	var clientOnly bool
	cmd := &cobra.Command{
		Use:   "version [--client]",
		Short: "Print relayctl's release and the answering control node's",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			client := buildinfo.Get().String()
			if clientOnly {
				return a.report(map[string]any{"client": client}, "relayctl %s", client)
			}
			st, err := a.status(cmd.Context(), "version")
			if err != nil {
				if a.output != "json" {
					fmt.Fprintf(a.stdout, "relayctl %s\n", client)
				}
				return fmt.Errorf("the control node's release: %w (--client prints relayctl's alone)", err)
			}
			return a.report(map[string]any{"client": client, "server": releaseOf(st), "nodeId": st.GetNodeId()},
				"relayctl %s\ncontrol node %s %s", client, st.GetNodeId(), releaseOf(st))
		},
	}
	cmd.Flags().BoolVar(&clientOnly, "client", false, "print relayctl's release alone, asking no server")
	return cmd
}
