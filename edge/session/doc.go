// Package session is the edge's session core, independent of the
// transport: it runs each device connection (a devconn.Conn) through the
// handshake (the signed transcript of edge/proof, or a resume ticket
// sealed with the cluster's session-key ring), registers the session in
// the Hub's room of its user, and relays events between the sessions of
// one user: validation, per-sender order and duplicates, bounded queues,
// receipts and acks, presence, mailboxes for offline devices and the
// mesh to other edges (through the interfaces Directory, Mailbox and
// Remote, which edge/server wires to the real parts). Every way a
// session ends goes through one close path.
package session
