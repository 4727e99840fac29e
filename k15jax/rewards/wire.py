"""Function tests across two processes: the checker runs the tests, the candidate answers calls.

The candidate's process (`callee`) loads the solution and answers one call per line; the
checker's process (`checker`, another uid) runs the test code against stand-in functions that
send each call over a pipe and decode the reply. Values cross as plain data: `encode` accepts
exact builtin types only (`type(x) is int`, never a subclass) and `decode` builds nothing else,
so whatever the candidate does to its own interpreter (`print`, `sys.stdout`, `compile`,
`math.isclose`, an object whose `__eq__` is always true) cannot reach a verdict. The candidate
never sees the tests or the expected values; its stdout is not the verdict channel.

Both sides import only the standard library (this file is copied into the sandbox as
`/box/wire.py`). Limits of the exchange: arguments and results are None, bool, int, float,
complex, str, bytes and lists, tuples, dicts, sets and frozensets of these; a function passed as
an argument, an instance of the solution's own class, or an argument the solution mutates in
place are not supported (the test sees a runtime error, or the unmutated argument).
Exceptions the candidate raises reach the test as the builtin exception of the same name
(`ValueError`, ...; AssertionError and anything else as RuntimeError).
"""

import builtins
import json
import os
import sys

_MAX_DEPTH = 200
CANDIDATE_GONE = 3  # the checker's exit status when the candidate stopped answering
_MAX_LINE = 64 << 20


class Unencodable(TypeError):
    """A value outside the plain-data types."""


class CandidateGone(RuntimeError):
    """The candidate's process ended or broke the protocol."""


def encode(x, depth: int = 0):
    """Returns `x` as JSON-ready tagged data; raises Unencodable for any other type."""
    if depth > _MAX_DEPTH:
        raise Unencodable("nested too deeply")
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return ["i", format(x, "x")]  # hex: no digit limit (decimal str() stops at 4300 digits)
    if t is float:
        return ["f", x.hex()]
    if t is complex:
        return ["c", x.real.hex(), x.imag.hex()]
    if t is bytes:
        return ["b", x.hex()]
    tags = {list: "l", tuple: "t", set: "s", frozenset: "z"}
    if t in tags:
        return [tags[t], [encode(v, depth + 1) for v in x]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]]
    raise Unencodable(f"{t.__name__} is not plain data")


def decode(x, depth: int = 0):
    """Inverse of `encode`; builds builtin types only and raises ValueError on anything else."""
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    if x is None or type(x) is bool or type(x) is str:
        return x
    if type(x) is not list or not x or type(x[0]) is not str:
        raise ValueError(f"not tagged data: {type(x).__name__}")
    tag, rest = x[0], x[1:]
    if tag in ("i", "f", "b") and len(rest) == 1 and type(rest[0]) is str:
        if tag == "i":
            return int(rest[0], 16)
        return float.fromhex(rest[0]) if tag == "f" else bytes.fromhex(rest[0])
    if tag == "c" and len(rest) == 2 and all(type(r) is str for r in rest):
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag in ("l", "t", "s", "z", "d") and len(rest) == 1 and type(rest[0]) is list:
        if tag == "d":
            pairs = [p for p in rest[0] if type(p) is list and len(p) == 2]
            if len(pairs) != len(rest[0]):
                raise ValueError("bad dict entry")
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in pairs}
        items = [decode(v, depth + 1) for v in rest[0]]
        return {"l": list, "t": tuple, "s": set, "z": frozenset}[tag](items)
    raise ValueError(f"bad tag {tag!r}")


def _send(f, message: dict) -> None:
    f.write(json.dumps(message) + "\n")
    f.flush()


# --------------------------------------------------------------------- candidate side


def callee(solution_path: str) -> None:
    """Loads the solution and answers calls from fd 0 on fd 1 until fd 0 closes."""
    calls = os.fdopen(os.dup(0), "r", encoding="utf-8", errors="surrogatepass")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8", errors="surrogatepass")
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)  # the solution's own input() sees EOF
    os.dup2(2, 1)  # and its prints go to stderr, not to the replies
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        with open(solution_path, encoding="utf-8") as f:
            exec(compile(f.read(), "solution.py", "exec"), ns)
    except BaseException as err:  # noqa: BLE001 (the checker reports it per test)
        _send(replies, {"load_error": type(err).__name__})
        return
    _send(replies, {"ready": sorted(n for n, v in ns.items() if callable(v) and n[:2] != "__")})
    for line in calls:
        call = json.loads(line)
        try:
            args, kwargs = decode(call["args"]), decode(call["kwargs"])
            result = {"ok": encode(ns[call["name"]](*args, **kwargs))}
        except Unencodable as err:
            result = {"unencodable": str(err)}
        except BaseException as err:  # noqa: BLE001 (the exception is the answer)
            result = {"raise": type(err).__name__}
        _send(replies, result)


# ----------------------------------------------------------------------- checker side

_VERDICT_OF = {AssertionError: "wrong_answer", MemoryError: "memory"}
# Exceptions that steer the test's own control flow rather than fail it (StopIteration ends a
# map() or filter() early): from the candidate they arrive as RuntimeError.
_NOT_FORWARDED = (AssertionError, StopIteration, StopAsyncIteration)


def _remote(name: str, calls, replies):
    def call(*args, **kwargs):
        _send(calls, {"name": name, "args": encode(list(args)), "kwargs": encode(kwargs)})
        return _answer(replies.readline(_MAX_LINE))

    call.__name__ = call.__qualname__ = name
    return call


def _answer(line: str):
    if not line.endswith("\n"):
        raise CandidateGone("the candidate stopped answering")
    try:
        reply = json.loads(line)
        if type(reply) is not dict or len(reply) != 1:
            raise ValueError("not one field")
        ((kind, value),) = reply.items()
        if kind == "ok":
            return decode(value)
    except (ValueError, RecursionError) as err:
        raise CandidateGone(f"malformed reply: {err}") from None
    if kind == "raise" and type(value) is str:
        exc = getattr(builtins, value, None)
        if isinstance(exc, type) and issubclass(exc, Exception) and exc not in _NOT_FORWARDED:
            raise exc(f"raised by the candidate: {value}")
        raise RuntimeError(f"raised by the candidate: {value}")
    raise RuntimeError(f"the candidate's result is not plain data ({value!r:.80})")


def _names_used(sources) -> set[str]:
    """Returns the names the test sources read (the candidate may stand in for those only)."""
    import ast

    used = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue  # running it gives the test its runtime_error verdict
        used.update(node.id for node in ast.walk(tree) if isinstance(node, ast.Name))
    return used


def checker(tests_path: str) -> None:
    """Runs each test against the candidate; writes one JSON verdict line per test to fd 1.

    The tests' own output (a test may print what the candidate returned) goes to stderr, so
    nothing but this function writes on the verdict channel.
    """
    with open(tests_path, encoding="utf-8", errors="surrogatepass") as f:
        spec = json.load(f)
    verdicts = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    calls = os.fdopen(3, "w", encoding="utf-8", errors="surrogatepass")
    replies = os.fdopen(4, "r", encoding="utf-8", errors="surrogatepass")
    hello = json.loads(replies.readline(_MAX_LINE) or "{}")
    if type(hello) is not dict or type(hello.get("ready")) is not list:
        error = hello.get("load_error") if type(hello) is dict else None
        verdict = "memory" if error == "MemoryError" else "runtime_error"
        for i in range(len(spec["tests"])):
            _send(verdicts, {"test": i, "verdict": verdict, "error": f"load: {error}"})
        return
    ns = {"__name__": "__checker__"}
    if spec["prelude"]:  # the problem's own code (e.g. helpers in a HumanEval prompt)
        exec(compile(spec["prelude"], "prompt", "exec"), ns)
    # The candidate stands in for the entry point and for other names the tests read that
    # neither the problem nor Python defines: never for a builtin (`abs`, `set`, `range`).
    wanted = _names_used(spec["tests"]) - set(ns) - set(dir(builtins))
    for name in hello["ready"]:
        if type(name) is str and (name == spec["entry_point"] or name in wanted):
            ns[name] = _remote(name, calls, replies)
    for i, test in enumerate(spec["tests"]):
        error = ""
        try:
            exec(compile(test, f"test_{i}", "exec"), dict(ns))
            verdict = "passed"
        except CandidateGone:
            sys.exit(CANDIDATE_GONE)  # no verdict: the run's (timeout, memory, runtime_error)
        except BaseException as err:  # noqa: BLE001 (every failure is a verdict)
            verdict = _VERDICT_OF.get(type(err), "runtime_error")
            error = f"{type(err).__name__}: {err}"[:300]
        _send(verdicts, {"test": i, "verdict": verdict, "error": error})


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] in ("callee", "checker"):
    {"callee": callee, "checker": checker}[sys.argv[1]](sys.argv[2])
