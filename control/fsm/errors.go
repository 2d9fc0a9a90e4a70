package fsm

import (
	"errors"
	"fmt"

	statev1 "github.com/edge-relay/relay/proto/state/v1"
)

// Sentinel errors a caller branches on. An error from ResultError wraps
// exactly one of them; the API layer maps each to one Connect code.
var (
	// ErrInvalidArgument: the command itself is malformed.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrNotFound: the command names a record that does not exist (or, for
	// devices, belongs to another user: the two are indistinguishable).
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists: the command would create a duplicate.
	ErrAlreadyExists = errors.New("already exists")
	// ErrFailedPrecondition: the state does not allow the command now
	// (for example a device registered to a disabled user).
	ErrFailedPrecondition = errors.New("failed precondition")
	// ErrCompacted: the change feed no longer holds the requested revision.
	ErrCompacted = errors.New("revision compacted")
)

// ResultError turns a non-OK apply result into an error wrapping the
// matching sentinel; it returns nil for OK.
func ResultError(r *statev1.Result) error {
	if r == nil {
		return fmt.Errorf("%w: no result", ErrInvalidArgument)
	}
	var base error
	switch r.GetCode() {
	case statev1.ResultCode_RESULT_CODE_OK:
		return nil
	case statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT:
		base = ErrInvalidArgument
	case statev1.ResultCode_RESULT_CODE_NOT_FOUND:
		base = ErrNotFound
	case statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS:
		base = ErrAlreadyExists
	case statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION:
		base = ErrFailedPrecondition
	default:
		return fmt.Errorf("unknown result code %v: %s", r.GetCode(), r.GetMessage())
	}
	return &resultError{base: base, msg: r.GetMessage()}
}

// resultError is a rejected command: its text is the result's message
// alone (which already says what is wrong, "device \"d\" not found"),
// and it wraps the sentinel of its code, which the API turns into the
// Connect code that prefixes the message for the caller.
type resultError struct {
	base error
	msg  string
}

func (e *resultError) Error() string {
	if e.msg == "" {
		return e.base.Error()
	}
	return e.msg
}

func (e *resultError) Unwrap() error { return e.base }

// applyError is a rejection decided inside apply; it becomes a Result.
type applyError struct {
	code statev1.ResultCode
	msg  string
}

func (e *applyError) Error() string { return e.msg }

func reject(code statev1.ResultCode, format string, args ...any) *applyError {
	return &applyError{code: code, msg: fmt.Sprintf(format, args...)}
}

func invalid(format string, args ...any) *applyError {
	return reject(statev1.ResultCode_RESULT_CODE_INVALID_ARGUMENT, format, args...)
}

func notFound(format string, args ...any) *applyError {
	return reject(statev1.ResultCode_RESULT_CODE_NOT_FOUND, format, args...)
}

func exists(format string, args ...any) *applyError {
	return reject(statev1.ResultCode_RESULT_CODE_ALREADY_EXISTS, format, args...)
}

func precondition(format string, args ...any) *applyError {
	return reject(statev1.ResultCode_RESULT_CODE_FAILED_PRECONDITION, format, args...)
}
