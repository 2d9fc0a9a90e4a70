// Package session is the edge's transport-independent session core. So
// far it holds the two cryptographic pieces every transport shares: the
// handshake transcript a device signs, and resume tickets sealed with the
// cluster's session-key ring. The session state machine builds on them.
package session
