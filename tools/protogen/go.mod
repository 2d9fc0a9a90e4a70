// Module protogen pins the protoc plugins buf runs (protoc-gen-go,
// protoc-gen-connect-go). Kept apart from tools/buf because buf itself
// needs a newer google.golang.org/protobuf than the generator we pin.
module github.com/edge-relay/relay/tools/protogen

go 1.26.0

tool (
	connectrpc.com/connect/cmd/protoc-gen-connect-go
	google.golang.org/protobuf/cmd/protoc-gen-go
)

require (
	connectrpc.com/connect v1.21.1 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
)
