// Package openapi generates the OpenAPI 3 document of the JSON form of the
// control plane's Connect API from the compiled proto descriptors, so the
// document can never drift from the services it describes. Each RPC is a
// POST of its request message (protojson) to /<package>.<Service>/<Method>.
package openapi

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	"google.golang.org/protobuf/reflect/protoreflect"
)

// Info describes the document.
type Info struct {
	Title   string
	Version string
}

// Generate returns the OpenAPI 3.0 document (JSON) for the given services.
// public lists procedures that need no bearer token.
func Generate(info Info, services []protoreflect.ServiceDescriptor, public map[string]bool) ([]byte, error) {
	g := &gen{schemas: map[string]any{}}
	paths := map[string]any{}
	for _, svc := range services {
		for i := 0; i < svc.Methods().Len(); i++ {
			m := svc.Methods().Get(i)
			proc := "/" + string(svc.FullName()) + "/" + string(m.Name())
			op := map[string]any{
				"operationId": string(svc.Name()) + "_" + string(m.Name()),
				"tags":        []string{string(svc.Name())},
				"summary":     firstLine(comment(m)),
				"description": comment(m),
				"requestBody": map[string]any{
					"required": true,
					"content":  map[string]any{"application/json": map[string]any{"schema": g.ref(m.Input())}},
				},
				"responses": responses(g, m),
			}
			if public[proc] {
				op["security"] = []any{}
			}
			if m.IsStreamingServer() || m.IsStreamingClient() {
				op["description"] = comment(m) + "\n\nStreaming RPC: use a Connect or gRPC client; the JSON form uses the Connect streaming envelope (application/connect+json)."
			}
			paths[proc] = map[string]any{"post": op}
		}
	}
	doc := map[string]any{
		"openapi": "3.0.3",
		"info":    map[string]any{"title": info.Title, "version": info.Version},
		"paths":   paths,
		"components": map[string]any{
			"schemas": g.schemas,
			"securitySchemes": map[string]any{
				"bearer": map[string]any{"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
			},
		},
		"security": []any{map[string]any{"bearer": []any{}}},
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode openapi document: %w", err)
	}
	return append(b, '\n'), nil
}

func responses(g *gen, m protoreflect.MethodDescriptor) map[string]any {
	errSchema := map[string]any{"$ref": "#/components/schemas/connect.error"}
	g.schemas["connect.error"] = map[string]any{
		"type":        "object",
		"description": "A Connect error: code is one of the Connect/gRPC codes in snake_case.",
		"properties": map[string]any{
			"code":    map[string]any{"type": "string", "example": "invalid_argument"},
			"message": map[string]any{"type": "string"},
		},
	}
	return map[string]any{
		"200": map[string]any{
			"description": "Success.",
			"content":     map[string]any{"application/json": map[string]any{"schema": g.ref(m.Output())}},
		},
		"default": map[string]any{
			"description": "Error.",
			"content":     map[string]any{"application/json": map[string]any{"schema": errSchema}},
		},
	}
}

type gen struct {
	schemas map[string]any
}

func (g *gen) ref(md protoreflect.MessageDescriptor) map[string]any {
	name := string(md.FullName())
	if s, ok := wellKnown(name); ok {
		return s
	}
	if _, done := g.schemas[name]; !done {
		g.schemas[name] = nil // placeholder: breaks recursion
		g.schemas[name] = g.message(md)
	}
	return map[string]any{"$ref": "#/components/schemas/" + name}
}

func wellKnown(name string) (map[string]any, bool) {
	switch name {
	case "google.protobuf.Timestamp":
		return map[string]any{"type": "string", "format": "date-time"}, true
	case "google.protobuf.Duration":
		return map[string]any{"type": "string", "example": "1.5s"}, true
	case "google.protobuf.Empty":
		return map[string]any{"type": "object"}, true
	}
	return nil, false
}

func (g *gen) message(md protoreflect.MessageDescriptor) map[string]any {
	props := map[string]any{}
	fields := md.Fields()
	for i := 0; i < fields.Len(); i++ {
		f := fields.Get(i)
		s := g.field(f)
		if c := comment(f); c != "" {
			s["description"] = c
		}
		props[f.JSONName()] = s
	}
	out := map[string]any{"type": "object", "properties": props}
	if c := comment(md); c != "" {
		out["description"] = c
	}
	return out
}

func (g *gen) field(f protoreflect.FieldDescriptor) map[string]any {
	if f.IsMap() {
		return map[string]any{"type": "object", "additionalProperties": g.single(f.MapValue())}
	}
	s := g.single(f)
	if f.IsList() {
		return map[string]any{"type": "array", "items": s}
	}
	return s
}

func (g *gen) single(f protoreflect.FieldDescriptor) map[string]any {
	switch f.Kind() {
	case protoreflect.BoolKind:
		return map[string]any{"type": "boolean"}
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return map[string]any{"type": "integer", "format": "int32"}
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return map[string]any{"type": "integer", "format": "int64", "minimum": 0}
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return map[string]any{"type": "string", "format": "int64", "description": "64-bit integer as a decimal string"}
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return map[string]any{"type": "string", "format": "uint64", "description": "64-bit integer as a decimal string"}
	case protoreflect.FloatKind:
		return map[string]any{"type": "number", "format": "float"}
	case protoreflect.DoubleKind:
		return map[string]any{"type": "number", "format": "double"}
	case protoreflect.StringKind:
		return map[string]any{"type": "string"}
	case protoreflect.BytesKind:
		return map[string]any{"type": "string", "format": "byte"}
	case protoreflect.EnumKind:
		vals := f.Enum().Values()
		names := make([]string, 0, vals.Len())
		for i := 0; i < vals.Len(); i++ {
			names = append(names, string(vals.Get(i).Name()))
		}
		return map[string]any{"type": "string", "enum": names}
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return g.ref(f.Message())
	}
	return map[string]any{}
}

func comment(d protoreflect.Descriptor) string {
	loc := d.ParentFile().SourceLocations().ByDescriptor(d)
	return strings.TrimSpace(loc.LeadingComments)
}

func firstLine(s string) string {
	if i := strings.IndexAny(s, ".\n"); i >= 0 {
		return s[:i]
	}
	return s
}

// Services returns the services of the given proto packages among files,
// sorted by full name.
func Services(files interface {
	RangeFiles(func(protoreflect.FileDescriptor) bool)
}, packages ...string) []protoreflect.ServiceDescriptor {
	want := map[string]bool{}
	for _, p := range packages {
		want[p] = true
	}
	var out []protoreflect.ServiceDescriptor
	files.RangeFiles(func(fd protoreflect.FileDescriptor) bool {
		if want[string(fd.Package())] {
			for i := 0; i < fd.Services().Len(); i++ {
				out = append(out, fd.Services().Get(i))
			}
		}
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].FullName() < out[j].FullName() })
	return out
}
