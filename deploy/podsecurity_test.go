package deploy

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

const podSecurityEnforce = "pod-security.kubernetes.io/enforce"

// checkPodSecurity admits a pod template as Pod Security admission would
// in its namespace: the level of the namespace's enforce label (none is
// privileged, the API server's default). A pod the level forbids is never
// created, however healthy its manifest looks otherwise. These are the
// checks of the baseline and restricted levels that a relay pod could
// run into, not all of them (k8s.io/pod-security-admission has the full
// list).
func checkPodSecurity(t *testing.T, r *rendered, w workload) {
	t.Helper()
	level := "privileged"
	for _, ns := range r.namespaces {
		if ns.Name == w.namespace {
			if l, ok := ns.Labels[podSecurityEnforce]; ok {
				level = l
			}
		}
	}
	var denied []string
	switch level {
	case "privileged":
		return
	case "baseline", "restricted":
		denied = baselineViolations(w.spec)
		if level == "restricted" {
			denied = append(denied, restrictedViolations(w.spec)...)
		}
	default:
		t.Fatalf("namespace %s: %s %q is no Pod Security level", w.namespace, podSecurityEnforce, level)
	}
	for _, d := range denied {
		t.Errorf("%s %s would never be admitted to namespace %s, which enforces Pod Security %q: %s", w.kind, w.name, w.namespace, level, d)
	}
}

// baselineCapabilities are the capabilities the baseline level lets a
// container add.
var baselineCapabilities = []corev1.Capability{
	"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
	"SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}

func containers(s *corev1.PodSpec) []corev1.Container {
	return append(slices.Clone(s.InitContainers), s.Containers...)
}

func baselineViolations(s *corev1.PodSpec) []string {
	var out []string
	if s.HostNetwork || s.HostPID || s.HostIPC {
		out = append(out, "host namespaces (hostNetwork, hostPID, hostIPC)")
	}
	for _, v := range s.Volumes {
		if v.HostPath != nil {
			out = append(out, "hostPath volume "+v.Name)
		}
	}
	if s.SecurityContext != nil && s.SecurityContext.SeccompProfile != nil && s.SecurityContext.SeccompProfile.Type == corev1.SeccompProfileTypeUnconfined {
		out = append(out, "seccomp profile Unconfined")
	}
	for _, c := range containers(s) {
		for _, p := range c.Ports {
			if p.HostPort != 0 {
				out = append(out, "hostPort on "+c.Name+" port "+p.Name)
			}
		}
		sc := c.SecurityContext
		if sc == nil {
			continue
		}
		if ptrOr(sc.Privileged, false) {
			out = append(out, "privileged container "+c.Name)
		}
		if sc.Capabilities != nil {
			for _, cp := range sc.Capabilities.Add {
				if !slices.Contains(baselineCapabilities, cp) {
					out = append(out, "capability "+string(cp)+" added to "+c.Name)
				}
			}
		}
		if sc.SeccompProfile != nil && sc.SeccompProfile.Type == corev1.SeccompProfileTypeUnconfined {
			out = append(out, "seccomp profile Unconfined on "+c.Name)
		}
	}
	return out
}

func restrictedViolations(s *corev1.PodSpec) []string {
	var out []string
	for _, v := range s.Volumes {
		if v.ConfigMap == nil && v.CSI == nil && v.DownwardAPI == nil && v.EmptyDir == nil && v.Ephemeral == nil &&
			v.PersistentVolumeClaim == nil && v.Projected == nil && v.Secret == nil {
			out = append(out, "volume "+v.Name+" of a type restricted does not allow")
		}
	}
	psc := s.SecurityContext
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	for _, c := range containers(s) {
		sc := c.SecurityContext
		if sc == nil {
			sc = &corev1.SecurityContext{}
		}
		if ptrOr(sc.AllowPrivilegeEscalation, true) {
			out = append(out, c.Name+" may escalate privileges")
		}
		if !ptrOr(sc.RunAsNonRoot, ptrOr(psc.RunAsNonRoot, false)) {
			out = append(out, c.Name+" is not runAsNonRoot")
		}
		if ptrOr(sc.RunAsUser, ptrOr(psc.RunAsUser, 1)) == 0 {
			out = append(out, c.Name+" runs as uid 0")
		}
		sp := sc.SeccompProfile
		if sp == nil {
			sp = psc.SeccompProfile
		}
		if sp == nil || (sp.Type != corev1.SeccompProfileTypeRuntimeDefault && sp.Type != corev1.SeccompProfileTypeLocalhost) {
			out = append(out, c.Name+" has no RuntimeDefault or Localhost seccomp profile")
		}
		if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
			out = append(out, c.Name+" does not drop ALL capabilities")
		} else {
			for _, cp := range sc.Capabilities.Add {
				if cp != "NET_BIND_SERVICE" {
					out = append(out, "capability "+string(cp)+" added to "+c.Name)
				}
			}
		}
	}
	return out
}
