// merbridge-cni, the executable the container runtime runs: static, standard
// library only, so it needs nothing from the node but the kernel.
//
// It forwards each invocation (the CNI_* variables and stdin) to the node
// daemon (POST /v1/cni/exec on its unix socket), where the plugin's Python
// skel and commands (merbridge.cni) run it in-process, and prints what comes
// back. The CNI semantics are defined there, once.
//
// Only when no daemon answers does this program decide by itself, and then
// it does what merbridge.cni.plugin does with an unreachable daemon: the
// skel's checks (same order, same codes), then ADD passes prevResult through
// and remembers the invocation in pendingDir (failOpen, the default) or
// fails with code 11; DEL succeeds and forgets a remembered ADD; CHECK and
// GC answer 11, STATUS 50. VERSION is always answered here.
// tests/unit/test_static_plugin.py runs both on the same inputs and compares;
// every name and number shared with Python is in contract.go, generated
// from the Python definitions.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf16"
	"unicode/utf8"
)

type envRule struct {
	name     string
	commands []string
}

type cniError struct {
	code    int
	msg     string
	details string
}

func (e *cniError) Error() string {
	if e.details != "" {
		return e.msg + "; " + e.details
	}
	return e.msg
}

func fail(code int, msg, details string) *cniError { return &cniError{code, msg, details} }

var levels = map[string]int{"debug": 10, "info": 20, "warning": 30, "error": 40}
var logLevel = 20

func logf(level int, name, format string, args ...interface{}) {
	if level < logLevel {
		return
	}
	fmt.Fprintf(os.Stderr, "merbridge-cni %s: %s\n", name, fmt.Sprintf(format, args...))
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func main() { os.Exit(run()) }

func run() int {
	env := map[string]string{}
	for _, name := range ExecEnv {
		if v := os.Getenv(name); v != "" {
			env[name] = v
		}
	}
	command := env["CNI_COMMAND"]
	if command == "VERSION" {
		// byte for byte what the Python skel prints (json.dumps' separators)
		quoted := make([]string, len(SupportedVersions))
		for i, v := range SupportedVersions {
			quoted[i] = strconv.Quote(v)
		}
		fmt.Printf("{\"cniVersion\": %s, \"supportedVersions\": [%s]}\n",
			strconv.Quote(CurrentVersion), strings.Join(quoted, ", "))
		return 0
	}
	var stdin []byte
	var readErr error
	if contains(Commands, command) {
		stdin, readErr = io.ReadAll(io.LimitReader(os.Stdin, MaxStdin+1))
	}
	var why error = errors.New("stdin could not be read")
	if readErr == nil {
		if sock, timeout, ok := daemonAddress(stdin); ok {
			reply, err := forward(sock, timeout, env, stdin)
			if err == nil {
				return reply()
			}
			why = err
		} else {
			why = errors.New("no usable socketPath/timeoutSeconds in the network config")
		}
	}
	return offline(env, stdin, readErr, why)
}

// ------------------------------------------------------------------ online

// daemonAddress: the socket and timeout the config names (defaults for a config
// that is not JSON: the daemon reports that); ok=false for unusable values.
func daemonAddress(stdin []byte) (string, time.Duration, bool) {
	var raw map[string]json.RawMessage
	if json.Unmarshal(stdin, &raw) != nil {
		return DefaultSocketPath, time.Duration(DefaultTimeout * float64(time.Second)), true
	}
	sock, err := socketPath(raw)
	if err != nil {
		return "", 0, false
	}
	timeout, err := timeoutSeconds(raw)
	if err != nil {
		return "", 0, false
	}
	return sock, time.Duration(timeout * float64(time.Second)), true
}

type execRequest struct {
	Env   map[string][]byte `json:"env"`
	Stdin []byte            `json:"stdin"`
}

type execReply struct {
	Exit   *int   `json:"exit"`
	Stdout []byte `json:"stdout"`
	Stderr []byte `json:"stderr"`
}

type errorReply struct {
	Code    int    `json:"code"`
	Msg     string `json:"msg"`
	Details string `json:"details"`
}

func invocation(env map[string]string, stdin []byte) []byte {
	req := execRequest{Env: map[string][]byte{}, Stdin: stdin}
	for k, v := range env {
		req.Env[k] = []byte(v)
	}
	if req.Stdin == nil {
		req.Stdin = []byte{}
	}
	body, _ := json.Marshal(req)
	return body
}

// forward posts the invocation; the returned function prints the daemon's
// answer and gives the exit status. An error means no usable answer.
func forward(sock string, timeout time.Duration, env map[string]string, stdin []byte) (func() int, error) {
	deadline := time.Now().Add(timeout)
	conn, err := net.DialTimeout("unix", sock, timeout)
	if err != nil {
		return nil, fmt.Errorf("cannot connect to %s: %v", sock, err)
	}
	defer conn.Close()
	conn.SetDeadline(deadline)
	body := invocation(env, stdin)
	head := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: merbridge\r\nConnection: close\r\n"+
		"Content-Type: %s\r\nContent-Length: %d\r\n\r\n", ExecPath, ContentType, len(body))
	if _, err := conn.Write(append([]byte(head), body...)); err != nil {
		return nil, fmt.Errorf("no reply from %s: %v", sock, err)
	}
	raw, err := io.ReadAll(io.LimitReader(conn, MaxExecBody+16*1024))
	if err != nil {
		return nil, fmt.Errorf("no reply from %s: %v", sock, err)
	}
	status, data, err := parseResponse(raw)
	if err != nil {
		return nil, fmt.Errorf("no reply from %s: %v", sock, err)
	}
	if status == 200 {
		var reply execReply
		if json.Unmarshal(data, &reply) != nil || reply.Exit == nil {
			return nil, fmt.Errorf("bad reply from %s", sock)
		}
		return func() int {
			os.Stdout.Write(reply.Stdout)
			os.Stderr.Write(reply.Stderr)
			return *reply.Exit
		}, nil
	}
	var refused errorReply
	if json.Unmarshal(data, &refused) != nil || refused.Code <= 0 {
		return nil, fmt.Errorf("bad reply from %s (HTTP %d)", sock, status)
	}
	return func() int {
		return report(env["CNI_COMMAND"], env["CNI_CONTAINERID"], configVersion(stdin),
			fail(refused.Code, refused.Msg, refused.Details))
	}, nil
}

func parseResponse(raw []byte) (int, []byte, error) {
	i := bytes.Index(raw, []byte("\r\n\r\n"))
	if i < 0 {
		return 0, nil, errors.New("incomplete reply")
	}
	lines := strings.Split(string(raw[:i]), "\r\n")
	body := raw[i+4:]
	parts := strings.SplitN(lines[0], " ", 3)
	if len(parts) < 2 || !strings.HasPrefix(parts[0], "HTTP/1.") {
		return 0, nil, errors.New("not an HTTP reply")
	}
	status, err := strconv.Atoi(parts[1])
	if err != nil {
		return 0, nil, errors.New("not an HTTP status")
	}
	for _, line := range lines[1:] {
		name, value, ok := strings.Cut(line, ":")
		if ok && strings.EqualFold(strings.TrimSpace(name), "content-length") {
			n, err := strconv.Atoi(strings.TrimSpace(value))
			if err != nil || n < 0 || n > len(body) {
				return 0, nil, errors.New("body incomplete")
			}
			body = body[:n]
		}
	}
	return status, body, nil
}

// ----------------------------------------------------------------- offline

func emit(obj interface{}) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.Encode(obj)
	os.Stdout.Write(append(pyStyle(bytes.TrimSpace(buf.Bytes())), '\n'))
}

// pyStyle respaces compact JSON as Python's json.dumps prints it (", " and ": "
// between items, non-ASCII as \uXXXX), so that both plugins print the same bytes.
func pyStyle(compact []byte) []byte {
	var out bytes.Buffer
	inString, escaped := false, false
	for _, r := range string(compact) {
		switch {
		case inString && escaped:
			escaped = false
		case inString && r == '\\':
			escaped = true
		case r == '"':
			inString = !inString
		case !inString && (r == ',' || r == ':'):
			out.WriteRune(r)
			out.WriteByte(' ')
			continue
		}
		if r > 0x7f {
			for _, u := range utf16.Encode([]rune{r}) {
				fmt.Fprintf(&out, "\\u%04x", u)
			}
			continue
		}
		out.WriteRune(r)
	}
	return out.Bytes()
}

type errorJSON struct {
	CniVersion string `json:"cniVersion"`
	Code       int    `json:"code"`
	Msg        string `json:"msg"`
	Details    string `json:"details,omitempty"`
}

// report prints the spec's error JSON (the config's version when supported).
func report(command, containerID, version string, e *cniError) int {
	if command == "" {
		command = "?"
	}
	logf(40, "ERROR", "%s %s: code %d: %s", command, containerID, e.code, e.Error())
	if !contains(SupportedVersions, version) {
		version = CurrentVersion
	}
	emit(errorJSON{version, e.code, e.msg, e.details})
	return 1
}

func configVersion(stdin []byte) string {
	var c struct {
		CniVersion string `json:"cniVersion"`
	}
	json.Unmarshal(stdin, &c)
	if c.CniVersion == "" {
		return ImplicitVersion
	}
	return c.CniVersion
}

func offline(env map[string]string, stdin []byte, readErr error, why error) int {
	command, cid := env["CNI_COMMAND"], env["CNI_CONTAINERID"]
	version := ""
	out, err := offlineCommand(env, stdin, readErr, why, &version)
	if err != nil {
		return report(command, cid, version, err)
	}
	if out != nil {
		os.Stdout.Write(append(out, '\n'))
	}
	return 0
}

func offlineCommand(env map[string]string, stdin []byte, readErr, why error, version *string) ([]byte, *cniError) {
	command := env["CNI_COMMAND"]
	var missing []string
	for _, rule := range EnvTable {
		if env[rule.name] == "" && (rule.name == "CNI_COMMAND" || contains(rule.commands, command)) {
			missing = append(missing, rule.name)
		}
	}
	if len(missing) > 0 {
		if command == "" {
			logf(40, "ERROR", "%s; CNI protocol versions supported: %s", About, strings.Join(SupportedVersions, ", "))
		}
		return nil, fail(CodeInvalidEnvironment, fmt.Sprintf("required env variables [%s] missing", strings.Join(missing, ",")), "")
	}
	if !contains(Commands, command) {
		return nil, fail(CodeInvalidEnvironment, "unknown CNI_COMMAND: "+truncate(command, 40), "")
	}
	if readErr != nil {
		return nil, fail(CodeIOFailure, "error reading from stdin", readErr.Error())
	}
	conf, e := decodeConfig(stdin)
	if e != nil {
		return nil, e
	}
	*version = ImplicitVersion
	if v, ok := conf["cniVersion"]; ok {
		var s string
		json.Unmarshal(v, &s)
		if s != "" {
			*version = s
		}
	}
	cid, ifname, netns := env["CNI_CONTAINERID"], env["CNI_IFNAME"], env["CNI_NETNS"]
	if contains(ContainerCommands, command) {
		if !validID(cid) {
			return nil, fail(CodeInvalidEnvironment, "invalid characters in containerID", truncate(cid, 100))
		}
		if e := checkIfname(ifname); e != nil {
			return nil, e
		}
	}
	if e := checkVersion(*version, command); e != nil {
		return nil, e
	}
	override := strings.ToLower(env["CNI_NETNS_OVERRIDE"])
	if netns != "" && contains(ContainerCommands, command) && override != "1" && override != "true" && sameNetns(netns) {
		return nil, fail(CodeInvalidNetns, "plugin's netns and netns from CNI_NETNS should not be the same", "")
	}
	if v, ok := conf["logLevel"]; ok {
		var s string
		if json.Unmarshal(v, &s) == nil {
			if l, ok := levels[s]; ok {
				logLevel = l
			}
		}
	}
	unavailable := fail(CodeTryAgainLater, "merbridge daemon unavailable, try again later", why.Error())
	switch command {
	case "ADD":
		nc, e := parseNetconf(conf)
		if e != nil {
			return nil, e
		}
		if nc.prevResult == nil {
			return nil, fail(CodeInvalidNetworkConfig, "must be called as a chained plugin",
				"no prevResult: list merbridge-cni after the main plugin")
		}
		out := pyStyle(passthrough(nc.prevResult, *version))
		var prev bytes.Buffer
		json.Compact(&prev, nc.prevResult)
		logf(10, "DEBUG", "ADD %s prevResult: %s", cid, pyStyle(prev.Bytes()))
		pod, e := target(env["CNI_ARGS"], nc)
		if e != nil || pod == nil {
			return out, e
		}
		if e := checkRequest(env, nc, pod, *version); e != nil {
			return nil, e
		}
		if !nc.failOpen {
			return nil, unavailable
		}
		where, err := remember(nc.pendingDir, cid, invocation(env, stdin))
		if err != nil {
			where = fmt.Sprintf("nowhere (%v); the daemon finds the pod by its IP", err)
		}
		logf(30, "WARNING", "ADD %s %s: %s; passing through (failOpen), remembered in %s", pod, cid, unavailable.Error(), where)
		return out, nil
	case "DEL":
		nc, e := parseNetconf(conf)
		if e != nil {
			logf(30, "WARNING", "DEL %s: %s; reporting success anyway", cid, e.Error())
			return nil, nil
		}
		if err := os.Remove(filepath.Join(nc.pendingDir, cid+PendingSuffix)); err != nil && !os.IsNotExist(err) {
			logf(30, "WARNING", "DEL %s: cannot forget its ADD: %v", cid, err)
		}
		pod, e := target(env["CNI_ARGS"], nc)
		if e == nil && pod != nil {
			logf(30, "WARNING", "DEL %s: %s; reporting success anyway", cid, unavailable.Error())
		}
		return nil, nil
	case "CHECK":
		nc, e := parseNetconf(conf)
		if e != nil {
			return nil, e
		}
		if nc.prevResult == nil {
			return nil, fail(CodeInvalidNetworkConfig, "must be called as a chained plugin", "no prevResult on CHECK")
		}
		pod, e := target(env["CNI_ARGS"], nc)
		if e != nil || pod == nil {
			return nil, e
		}
		if e := checkRequest(env, nc, pod, *version); e != nil {
			return nil, e
		}
		return nil, unavailable
	case "STATUS":
		if _, e := parseNetconf(conf); e != nil {
			return nil, e
		}
		return nil, fail(CodePluginNotAvailable, "merbridge daemon is not available", why.Error())
	case "GC":
		if _, e := parseNetconf(conf); e != nil {
			return nil, e
		}
		if e := checkAttachments(conf); e != nil {
			return nil, e
		}
		return nil, unavailable
	}
	return nil, fail(CodeInternal, "internal error", "unreachable")
}

func truncate(s string, n int) string {
	r := []rune(s)
	if len(r) > n {
		return string(r[:n])
	}
	return s
}

func validID(s string) bool {
	if s == "" || strings.ContainsRune("_.-", rune(s[0])) {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}

func checkIfname(name string) *cniError {
	if utf8.RuneCountInString(name) > MaxIfname {
		return fail(CodeInvalidEnvironment, "interface name is too long",
			fmt.Sprintf("interface name should be less than %d characters", MaxIfname+1))
	}
	if name == "." || name == ".." {
		return fail(CodeInvalidEnvironment, "interface name is . or ..", "")
	}
	for _, c := range name {
		if c == '/' || c == ':' || c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' ||
			c == 0x1c || c == 0x1d || c == 0x1e || c == 0x1f || c == 0x85 || c == 0xa0 || (c > 0x7f && isSpace(c)) {
			return fail(CodeInvalidEnvironment, "interface name contains / or : or whitespace characters", "")
		}
	}
	return nil
}

func isSpace(c rune) bool { return strings.TrimSpace(string(c)) == "" }

func parseVersion(v string) [3]int {
	var out [3]int
	for i, p := range strings.SplitN(v, ".", 3) {
		out[i], _ = strconv.Atoi(p)
	}
	return out
}

func checkVersion(version, command string) *cniError {
	if !contains(SupportedVersions, version) {
		quoted := make([]string, len(SupportedVersions))
		for i, v := range SupportedVersions {
			quoted[i] = "'" + v + "'"
		}
		return fail(CodeIncompatibleVersion, "incompatible CNI versions",
			fmt.Sprintf("config is \"%s\", plugin supports [%s]", version, strings.Join(quoted, ", ")))
	}
	min, ok := MinVersion[command]
	if !ok {
		return nil
	}
	a, b := parseVersion(version), parseVersion(min)
	for i := 0; i < 3; i++ {
		if a[i] != b[i] {
			if a[i] < b[i] {
				return fail(CodeIncompatibleVersion, "config version does not allow "+command,
					fmt.Sprintf("%s needs cniVersion >= %s", command, min))
			}
			return nil
		}
	}
	return nil
}

func sameNetns(path string) bool {
	var ours, theirs syscall.Stat_t
	if syscall.Stat("/proc/self/ns/net", &ours) != nil || syscall.Stat(path, &theirs) != nil {
		return false
	}
	return ours.Dev == theirs.Dev && ours.Ino == theirs.Ino
}

func decodeConfig(stdin []byte) (map[string]json.RawMessage, *cniError) {
	bad := func(details string) *cniError {
		return fail(CodeDecodingFailure, "error decoding network config", details)
	}
	if len(stdin) > MaxStdin {
		return nil, fail(CodeDecodingFailure, "network config too large", fmt.Sprintf("more than %d bytes on stdin", MaxStdin))
	}
	if !utf8.Valid(stdin) {
		return nil, bad("not UTF-8")
	}
	var any interface{}
	if err := json.Unmarshal(stdin, &any); err != nil {
		return nil, bad(truncate(err.Error(), 200))
	}
	if _, ok := any.(map[string]interface{}); !ok {
		return nil, bad("expected a JSON object")
	}
	var conf map[string]json.RawMessage
	json.Unmarshal(stdin, &conf)
	if v, ok := conf["name"]; ok && string(v) != "null" {
		var name string
		if json.Unmarshal(v, &name) != nil {
			return nil, bad(`"name" must be a string`)
		}
		if name != "" && !validID(name) {
			return nil, fail(CodeInvalidNetworkConfig, "invalid characters found in network name", truncate(name, 100))
		}
	}
	var name string
	json.Unmarshal(conf["name"], &name)
	if name == "" {
		return nil, fail(CodeInvalidNetworkConfig, "missing network name", "")
	}
	if v, ok := conf["cniVersion"]; ok {
		var s string
		if json.Unmarshal(v, &s) != nil || string(v) == "null" {
			return nil, bad(`"cniVersion" must be a string`)
		}
	}
	return conf, nil
}

// -------------------------------------------------------------- netconf

type netConf struct {
	name       string
	socketPath string
	excluded   []string
	failOpen   bool
	pendingDir string
	prevResult json.RawMessage
}

func badKey(key, why string) *cniError {
	return fail(CodeInvalidNetworkConfig, fmt.Sprintf("invalid '%s' in network config", key), why)
}

func socketPath(raw map[string]json.RawMessage) (string, *cniError) {
	v, ok := raw["socketPath"]
	if !ok {
		return DefaultSocketPath, nil
	}
	var s string
	if json.Unmarshal(v, &s) != nil || string(v) == "null" || !strings.HasPrefix(s, "/") {
		return "", badKey("socketPath", "must be an absolute path")
	}
	if len(s) > MaxSocketPath || strings.ContainsRune(s, 0) {
		return "", badKey("socketPath", fmt.Sprintf("must be at most %d bytes, without NUL", MaxSocketPath))
	}
	return s, nil
}

func timeoutSeconds(raw map[string]json.RawMessage) (float64, *cniError) {
	v, ok := raw["timeoutSeconds"]
	if !ok {
		return DefaultTimeout, nil
	}
	var f float64
	if json.Unmarshal(v, &f) != nil || string(v) == "null" || !(f > 0 && f <= MaxTimeout) {
		return 0, badKey("timeoutSeconds", fmt.Sprintf("must be a number in (0, %g]", MaxTimeout))
	}
	return f, nil
}

func parseNetconf(raw map[string]json.RawMessage) (*netConf, *cniError) {
	nc := &netConf{excluded: DefaultExcludeNamespaces, failOpen: DefaultFailOpen, pendingDir: DefaultPendingDir}
	json.Unmarshal(raw["name"], &nc.name)
	var e *cniError
	if nc.socketPath, e = socketPath(raw); e != nil {
		return nil, e
	}
	if _, e = timeoutSeconds(raw); e != nil {
		return nil, e
	}
	if v, ok := raw["excludeNamespaces"]; ok {
		if !stringList(v) {
			return nil, badKey("excludeNamespaces", "must be a list of namespace names")
		}
		json.Unmarshal(v, &nc.excluded)
	}
	if v, ok := raw["logLevel"]; ok {
		var s string
		if json.Unmarshal(v, &s) != nil || !contains(LogLevels, s) {
			return nil, badKey("logLevel", "must be one of "+strings.Join(LogLevels, ", "))
		}
	}
	if v, ok := raw["prevResult"]; ok && string(v) != "null" {
		var obj map[string]json.RawMessage
		if json.Unmarshal(v, &obj) != nil {
			return nil, badKey("prevResult", "must be a JSON object")
		}
		nc.prevResult = v
	}
	if v, ok := raw["failOpen"]; ok {
		if json.Unmarshal(v, &nc.failOpen) != nil || string(v) == "null" {
			return nil, badKey("failOpen", "must be true or false")
		}
	}
	if v, ok := raw["pendingDir"]; ok {
		if json.Unmarshal(v, &nc.pendingDir) != nil || !strings.HasPrefix(nc.pendingDir, "/") ||
			utf8.RuneCountInString(nc.pendingDir) > 4096 || strings.ContainsRune(nc.pendingDir, 0) {
			return nil, badKey("pendingDir", "must be an absolute path")
		}
	}
	return nc, nil
}

// stringList: a JSON list of strings only (null is not a list, nor a string)
func stringList(v json.RawMessage) bool {
	var items []interface{}
	if json.Unmarshal(v, &items) != nil || items == nil {
		return false
	}
	for _, it := range items {
		if _, ok := it.(string); !ok {
			return false
		}
	}
	return true
}

// passthrough: prevResult with cniVersion set, every other key in its order.
func passthrough(prev json.RawMessage, version string) []byte {
	dec := json.NewDecoder(bytes.NewReader(prev))
	dec.Token() // {
	var buf bytes.Buffer
	buf.WriteByte('{')
	ver, _ := json.Marshal(version)
	seen, first := false, true
	sep := func() {
		if !first {
			buf.WriteByte(',')
		}
		first = false
	}
	var keys []string
	values := map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			break
		}
		key := tok.(string)
		var value json.RawMessage
		if dec.Decode(&value) != nil {
			break
		}
		if _, dup := values[key]; !dup {
			keys = append(keys, key)
		}
		values[key] = value
	}
	for _, key := range keys {
		if key == "cniVersion" {
			seen = true
		}
	}
	if !seen {
		sep()
		buf.WriteString(`"cniVersion":`)
		buf.Write(ver)
	}
	for _, key := range keys {
		sep()
		k, _ := json.Marshal(key)
		buf.Write(k)
		buf.WriteByte(':')
		if key == "cniVersion" {
			buf.Write(ver)
		} else {
			var compact bytes.Buffer
			json.Compact(&compact, values[key])
			buf.Write(compact.Bytes())
		}
	}
	buf.WriteByte('}')
	return buf.Bytes()
}

// ----------------------------------------------------------------- pod

type pod struct{ namespace, name, uid string }

func (p *pod) String() string { return p.namespace + "/" + p.name }

func target(cniArgs string, nc *netConf) (*pod, *cniError) {
	args := map[string]string{}
	if cniArgs != "" {
		if !utf8.ValidString(cniArgs) {
			return nil, fail(CodeInvalidEnvironment, "invalid CNI_ARGS", "ARGS: not valid UTF-8")
		}
		for _, pair := range strings.Split(cniArgs, ";") {
			key, value, ok := strings.Cut(pair, "=")
			if !ok || key == "" || strings.Contains(value, "=") {
				return nil, fail(CodeInvalidEnvironment, "invalid CNI_ARGS", fmt.Sprintf("ARGS: invalid pair '%s'", truncate(pair, 100)))
			}
			args[key] = value
		}
		known := map[string]bool{"IgnoreUnknown": true, "K8S_POD_NAMESPACE": true, "K8S_POD_NAME": true,
			"K8S_POD_UID": true, "K8S_POD_INFRA_CONTAINER_ID": true}
		ignore := strings.ToLower(args["IgnoreUnknown"])
		for k := range args {
			if !known[k] && ignore != "1" && ignore != "true" {
				return nil, fail(CodeInvalidEnvironment, "invalid CNI_ARGS", "ARGS: unknown args (set IgnoreUnknown=1)")
			}
		}
	}
	if args["K8S_POD_NAMESPACE"] == "" || args["K8S_POD_NAME"] == "" {
		return nil, nil
	}
	if contains(nc.excluded, args["K8S_POD_NAMESPACE"]) {
		return nil, nil
	}
	return &pod{args["K8S_POD_NAMESPACE"], args["K8S_POD_NAME"], args["K8S_POD_UID"]}, nil
}

// checkRequest: what building the protocol's CniRequest checks (plugin._request),
// in its order: the shape of "ips", each address, the shape of "interfaces", limits.
func checkRequest(env map[string]string, nc *netConf, p *pod, version string) *cniError {
	bad := func(why string) *cniError { return badKey("prevResult", why) }
	cannot := func(why string) *cniError {
		return fail(CodeInvalidNetworkConfig, "cannot forward this call", why)
	}
	var prev map[string]json.RawMessage
	json.Unmarshal(nc.prevResult, &prev)
	var ips []map[string]json.RawMessage
	if v, ok := prev["ips"]; ok {
		var items []interface{}
		if json.Unmarshal(v, &items) != nil || items == nil {
			return bad(`"ips" must be a list`)
		}
		for _, it := range items {
			obj, ok := it.(map[string]interface{})
			if !ok {
				return bad(`each of "ips" needs an "address" string`)
			}
			if _, ok := obj["address"].(string); !ok {
				return bad(`each of "ips" needs an "address" string`)
			}
		}
		json.Unmarshal(v, &ips)
	}
	for _, ip := range ips {
		var text string
		json.Unmarshal(ip["address"], &text)
		if !strings.Contains(text, "/") || utf8.RuneCountInString(text) > 64 {
			return cannot(fmt.Sprintf("ip '%s' must be 'address/prefix'", truncate(text, 64)))
		}
		prefix, err := netip.ParsePrefix(text)
		if err != nil || prefix.Addr().Zone() != "" {
			return cannot(fmt.Sprintf("ip '%s' is not a valid 'address/prefix'", truncate(text, 64)))
		}
		if prefix.Addr().IsUnspecified() {
			return cannot(fmt.Sprintf("ip '%s' is the unspecified address, no pod's address", truncate(text, 64)))
		}
	}
	nIfaces := 0
	if v, ok := prev["interfaces"]; ok {
		var items []interface{}
		if json.Unmarshal(v, &items) != nil || items == nil {
			return bad(`"interfaces" must be a list`)
		}
		for _, it := range items {
			obj, ok := it.(map[string]interface{})
			if !ok {
				return bad(`each of "interfaces" needs string "name"/"sandbox"`)
			}
			for _, key := range []string{"name", "sandbox"} {
				if v, present := obj[key]; present {
					if _, isStr := v.(string); !isStr {
						return bad(`each of "interfaces" needs string "name"/"sandbox"`)
					}
				}
			}
			if s, _ := obj["sandbox"].(string); s != "" {
				nIfaces++
			}
		}
	}
	if len(ips) > 64 || nIfaces > 64 {
		return cannot("too many ips, interfaces or attachments")
	}
	for _, s := range []string{env["CNI_CONTAINERID"], env["CNI_IFNAME"], p.namespace, p.name, p.uid, version, nc.name} {
		if utf8.RuneCountInString(s) > 1024 {
			return cannot("a field is longer than 1024 characters")
		}
	}
	if utf8.RuneCountInString(env["CNI_NETNS"]) > 4096 {
		return cannot("'netns' longer than 4096 characters")
	}
	return nil
}

func checkAttachments(conf map[string]json.RawMessage) *cniError {
	for _, key := range GCAttachmentKeys {
		v, ok := conf[key]
		if !ok {
			continue
		}
		bad := badKey(GCAttachmentKeys[0], `each attachment must be {"containerID": str, "ifname": str}`)
		var items []interface{}
		if json.Unmarshal(v, &items) != nil || items == nil {
			return badKey(GCAttachmentKeys[0], "must be a list")
		}
		for _, it := range items {
			obj, ok := it.(map[string]interface{})
			if !ok {
				return bad
			}
			cid, ok1 := obj["containerID"].(string)
			ifname, ok2 := obj["ifname"].(string)
			if !ok1 || !ok2 {
				return bad
			}
			if cid == "" || utf8.RuneCountInString(cid) > 1024 || utf8.RuneCountInString(ifname) > 1024 ||
				strings.ContainsRune(cid, 0) || strings.ContainsRune(ifname, 0) {
				return fail(CodeInvalidNetworkConfig, "invalid GC attachments", "bad attachment")
			}
		}
		if len(items) > 8192 {
			return fail(CodeInvalidNetworkConfig, "invalid GC attachments", "too many ips, interfaces or attachments")
		}
		return nil
	}
	return nil
}

// remember writes the invocation where the daemon replays it (cni/pending.py).
func remember(dir, cid string, data []byte) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	final := filepath.Join(dir, cid+PendingSuffix)
	tmp := filepath.Join(dir, fmt.Sprintf(".%s.%d.tmp", cid, os.Getpid()))
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		os.Remove(tmp)
		return "", err
	}
	if err := os.Rename(tmp, final); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return final, nil
}
