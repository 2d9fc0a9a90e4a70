package api

// HoldHashSlots takes every hashing slot of a, as password checks under
// way would, until release is called.
func HoldHashSlots(a *Authenticator) (release func()) {
	for range cap(a.hashSlots) {
		a.hashSlots <- struct{}{}
	}
	return func() {
		for range cap(a.hashSlots) {
			<-a.hashSlots
		}
	}
}
