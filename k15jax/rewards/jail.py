"""The in-namespace launcher: builds a minimal root, starts the program, reports how it ended.

Run by `sandbox.Sandbox` as `python -I -S jail.py SPEC_PATH STATUS_FD` under util-linux
`unshare` (new mount, PID, network, IPC and UTS namespaces); it is PID 1 of its namespace.
It imports only the standard library, and it does, in order:

1. joins the run's cgroups (memory, pids, cpuacct: limits for the whole run);
2. builds the root in a fresh tmpfs: `/usr` (and the `/bin`, `/lib*` links) bound read-only
   and recursively, `/etc/ld.so.cache`, a few `/dev` nodes, private tmpfs `/tmp` and
   `/dev/shm` (every tmpfs, the root's too, capped in bytes and in inodes: `tmpfs_mb`,
   `tmpfs_inodes`), the read-only library directories, `/box` (the call exchange and,
   readable by the checker uid only, the tests); then `pivot_root` into it and detaches the
   old root, so no path (`..` included) leads back to the host; a fresh `/proc` shows this
   run only;
3. forks the program as the slot's uid in a user namespace of its own (only that uid mapped;
   no namespace may be made in it, inotify capped: `_USER_NS_LIMITS`), with rlimits, a
   scrubbed environment, a new session keyring and an emptied user keyring (stdin/stdout
   mode), or the candidate and the checker as two uids joined by two pipes (function mode,
   see `wire.py`);
4. when the program (or the checker) exits, kills everything left in the namespace, empties
   the uids' keyrings, and writes {"exit": n} or {"signal": n} (and the CPU seconds) to
   STATUS_FD, a pipe no sandboxed process holds.

Without isolation (`rlimits_only`) only step 3 (no uid switch) and step 4 run.
"""

import ctypes
import json
import os
import platform
import resource
import signal
import socket
import sys
import time

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND = 1, 2, 4, 32, 4096
_MS_REC, _MS_PRIVATE = 16384, 1 << 18
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}
_KEYCTL_JOIN_SESSION, _KEYCTL_CLEAR, _KEYCTL_GET_PERSISTENT = 1, 7, 22
_KEY_SPEC_SESSION, _KEY_SPEC_USER, _KEY_SPEC_USER_SESSION = -3, -4, -5
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_LIBC = ctypes.CDLL(None, use_errno=True)
_CANDIDATE_GONE = 3  # the checker's exit status when the candidate stopped answering (wire.py)
_LIBC.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()
    _check(_LIBC.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _bind_read_only(source: str, target: str, *, devices: bool = False) -> None:
    """Binds `source` (a path or /proc/self/fd/N) at `target`, read-only, submounts included."""
    _mount(source, target, None, _MS_BIND | _MS_REC)
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | (0 if devices else _MS_NODEV)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:  # every submount too: a plain remount covers the top one only
        if point == target or point.startswith(target.rstrip("/") + "/"):
            _mount(None, point, None, flags)


def _tmpfs(target: str, spec: dict, mode: str = "1777") -> None:
    """Mounts a tmpfs capped in bytes and in inodes (an empty file costs kernel memory too)."""
    data = f"size={spec['tmpfs_mb']}m,nr_inodes={spec['tmpfs_inodes']},mode={mode}"
    _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, data)


def _write(path: str, text: str, uid: int, mode: int) -> None:
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    os.chown(path, uid, uid)
    os.chmod(path, mode)


def _build_root(spec: dict) -> None:
    """Builds the minimal root described in the module docstring and pivots into it."""
    libs = {dst: os.open(src, os.O_PATH | os.O_DIRECTORY) for dst, src in spec["libraries"].items()}
    root = spec["root"]
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _tmpfs(root, spec, mode="755")
    for d in (*_SYSTEM_DIRS, *spec["extra_dirs"]):
        if os.path.islink(d):
            os.symlink(os.readlink(d), root + d)
        elif os.path.isdir(d):
            os.makedirs(root + d, exist_ok=True)
            _bind_read_only(d, root + d)
    for name in _SYSTEM_FILES:
        if os.path.isfile(name):
            os.makedirs(os.path.dirname(root + name), exist_ok=True)
            open(root + name, "w").close()
            _bind_read_only(name, root + name)
    os.makedirs(root + "/dev/shm")
    for name in _DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        _bind_read_only(f"/dev/{name}", f"{root}/dev/{name}", devices=True)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{root}/dev/{name}")
    os.symlink("/proc/self/fd", root + "/dev/fd")
    _tmpfs(root + "/dev/shm", spec)
    for d in ("/proc", "/tmp", "/var"):
        os.makedirs(root + d)
    os.symlink("../tmp", root + "/var/tmp")
    _tmpfs(root + "/tmp", spec)
    for dst, fd in libs.items():
        os.makedirs(root + dst)
        _bind_read_only(f"/proc/self/fd/{fd}", root + dst)
        os.close(fd)
    _write_box(spec, root)
    _mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir(root)
    _check(_LIBC.syscall(_SYS_PIVOT_ROOT[platform.machine()], b".", b"."), "pivot_root")
    _check(_LIBC.umount2(b".", _MNT_DETACH), "detach the old root")
    os.chdir("/")
    try:  # hidepid: the candidate does not even see the checker's process
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV, "hidepid=2")
    except OSError:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV)
    socket.sethostname("sandbox")
    _limit_ipc(spec)


def _limit_ipc(spec: dict) -> None:
    """Caps SysV IPC and POSIX queues in this run's IPC namespace (these sysctls are its own).

    A fresh namespace allows 32,000 SysV queues of 16 KiB each (512 MiB of kernel memory, the
    memory cgroup the only bound), 4,096 shared memory segments of any size, 32,000 semaphore
    sets and 256 POSIX queues: a handful of each is plenty for a program.
    """
    pages = spec["tmpfs_mb"] << 8  # 4 KiB pages: all shared memory together, like a tmpfs
    limits = {
        "kernel/msgmni": 16, "kernel/msgmnb": 16384, "kernel/msgmax": 8192,
        "kernel/shmmni": 16, "kernel/shmall": pages, "kernel/shmmax": pages << 12,
        "kernel/sem": "32 512 32 16",  # semaphores per set, in all, per semop call; sets
        "fs/mqueue/queues_max": 16, "fs/mqueue/msg_max": 10, "fs/mqueue/msgsize_max": 8192,
    }  # fmt: skip
    for name, value in limits.items():
        with open(f"/proc/sys/{name}", "w") as f:
            f.write(str(value))


def _write_box(spec: dict, prefix: str) -> None:
    """Writes the program's files (work dir, its uid) and the checker's (box dir, its uid)."""
    work, box = prefix + spec["workdir"], prefix + spec["boxdir"]
    uid, checker_uid = spec["uid"], spec["checker_uid"]
    os.makedirs(work, exist_ok=True)
    os.chown(work, uid, uid)
    for name, text in spec["files"].items():
        if os.path.basename(name) != name or name.startswith("."):
            raise ValueError(f"file name {name!r} must be a plain name")
        _write(os.path.join(work, name), text, uid, 0o644)
    if spec["checker"] is not None:
        os.makedirs(box + "/checker", exist_ok=True)
        os.chmod(box, 0o755)
        _write(box + "/wire.py", spec["wire"], 0, 0o644)
        os.chown(box + "/checker", checker_uid, checker_uid)
        os.chmod(box + "/checker", 0o700)
        _write(box + "/checker/tests.json", json.dumps(spec["checker"]), checker_uid, 0o400)


def _keyctl(*args) -> int:
    keyctl = _SYS_KEYCTL.get(platform.machine())
    return -1 if keyctl is None else _LIBC.syscall(keyctl, *[ctypes.c_long(a) for a in args])


def _empty_keyrings() -> None:
    """Empties this uid's user, user-session and persistent keyrings (kernel-wide per uid)."""
    for ring in (_KEY_SPEC_USER, _KEY_SPEC_USER_SESSION):
        _keyctl(_KEYCTL_CLEAR, ring)
    persistent = _keyctl(_KEYCTL_GET_PERSISTENT, -1, _KEY_SPEC_SESSION)
    if persistent > 0:
        _keyctl(_KEYCTL_CLEAR, persistent)


# A seccomp filter for sandboxed processes (x86-64): keyring syscalls (a key would outlive the
# run in the uid's kernel keyrings), io_uring (a large kernel surface nothing here needs) and
# AF_VSOCK sockets (vsock is not confined by the network namespace: it reaches the hypervisor)
# fail with EPERM, as do other ABIs (x32, 32-bit entry) whose numbers this filter does not know.
_AUDIT_ARCH_X86_64 = 0xC000003E
_DENIED_SYSCALLS = (248, 249, 250, 425, 426, 427)  # add_key request_key keyctl io_uring_*
_SYS_SOCKET, _AF_VSOCK = 41, 40


def _seccomp_program() -> bytes:
    """Returns the BPF program: [(code, jump if true, jump if false, k)] packed as sock_filter."""
    import struct

    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JGE|K, RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    n = len(_DENIED_SYSCALLS)
    last = 8 + n  # index of the "deny" return; "allow" is just before it
    prog = [(ld, 0, 0, 4), (jeq, 0, last - 2, _AUDIT_ARCH_X86_64), (ld, 0, 0, 0),
            (jge, last - 4, 0, 0x40000000)]  # fmt: skip
    prog += [(jeq, last - 5 - i, 0, nr) for i, nr in enumerate(_DENIED_SYSCALLS)]
    i = len(prog)
    prog += [
        (jeq, 0, last - 1 - (i + 1), _SYS_SOCKET),  # not socket(): allow
        (ld, 0, 0, 16),  # its first argument, the address family
        (jeq, last - (i + 3), 0, _AF_VSOCK),
        (ret, 0, 0, allow),
        (ret, 0, 0, deny),
    ]
    assert len(prog) == last + 1
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


def _seccomp() -> None:
    """Installs `_seccomp_program` for this process and everything it starts (x86-64 only)."""
    if platform.machine() != "x86_64":
        return  # the syscall numbers above are x86-64's; elsewhere the filter is not applied

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    code = _seccomp_program()
    prog = _Prog(len(code) // 8, code)
    _LIBC.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                            ctypes.c_ulong]  # fmt: skip
    _check(_LIBC.prctl(38, 1, None, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_LIBC.prctl(22, 2, ctypes.addressof(prog), 0, 0), "prctl(PR_SET_SECCOMP)")


# The user namespace each sandboxed process gets, owned by root (this launcher) with only the
# process's uid mapped: its counters (/proc/sys/user) are per run and its limits ours. No
# namespace may be made in it: a candidate's own user namespace (allowed to any uid) would make
# it root there, free to mount an uncapped tmpfs in a mount namespace of its own. inotify and
# fanotify marks pin kernel memory per watched inode (all of /usr: 137k of them): a few only.
_CLONE_NEWUSER = 0x10000000
_NAMESPACE_KINDS = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time")
_USER_NS_LIMITS = {
    **{f"max_{kind}_namespaces": 0 for kind in _NAMESPACE_KINDS},
    "max_inotify_instances": 8,
    "max_inotify_watches": 1024,
    "max_fanotify_groups": 0,
    "max_fanotify_marks": 0,
}


def _enter_user_namespace(ready_w: int, go_r: int) -> None:
    """Moves this (forked, still root) process into a new user namespace with our limits.

    Its uid and gid maps are written by the parent (`_map_uid`): only a process with
    CAP_SETUID outside the namespace may map a uid other than its own. Until `_as_uid` this
    process holds every capability in the namespace, so it can set the namespace's limits.
    """
    _check(_LIBC.unshare(_CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    os.write(ready_w, b"1")
    if os.read(go_r, 1) != b"1":
        raise OSError("the launcher did not map this process's uid")
    os.close(ready_w)
    os.close(go_r)
    for name, value in _USER_NS_LIMITS.items():
        path = f"/proc/sys/user/{name}"
        if os.path.exists(path):  # older kernels lack some (time namespaces, fanotify)
            with open(path, "w") as f:
                f.write(str(value))


def _map_uid(pid: int, uid: int) -> None:
    """Maps `uid` (and the gid of that number) to itself in `pid`'s user namespace, alone."""
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"{uid} {uid} 1\n")


def _as_uid(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _start(spec: dict, argv: list[str], fds: list[int], uid: int, cwd: str) -> int:
    """Forks `argv` with `fds` as its fds 0, 1, 2, ... as `uid`, limited; returns its pid."""
    ready_r, ready_w = os.pipe()  # child -> us: it is in its user namespace
    go_r, go_w = os.pipe()  # us -> child: its uid and gid maps are written
    pid = os.fork()
    if pid != 0:
        os.close(ready_w)
        os.close(go_r)
        if spec["isolated"] and os.read(ready_r, 1):
            _map_uid(pid, uid)
            os.write(go_w, b"1")
        os.close(ready_r)
        os.close(go_w)
        return pid
    try:
        os.close(ready_r)
        os.close(go_w)
        if spec["isolated"]:
            _enter_user_namespace(ready_w, go_r)
        moved = [os.dup(fd) for fd in fds]  # out of the way of the dup2s below
        for i, fd in enumerate(moved):
            os.dup2(fd, i)
        os.closerange(len(fds), 65536)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        _limit(spec)
        if spec["isolated"]:
            _as_uid(uid)
            _keyctl(_KEYCTL_JOIN_SESSION, 0)
            _empty_keyrings()
            _seccomp()
        os.chdir(cwd)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": cwd}
        os.execve(argv[0], argv, env)
    except BaseException as err:  # noqa: BLE001 (report why the program never started)
        os.write(2, f"sandbox: cannot start the program: {err!r}\n".encode())
    os._exit(127)


def _limit(spec: dict) -> None:
    cpu = int(-(-spec["cpu_s"] // 1))
    mem, out = spec["memory_mb"] << 20, spec["max_output_mb"] << 20
    limits = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_NOFILE, spec["max_open_files"], spec["max_open_files"]),
        (resource.RLIMIT_FSIZE, out, out),
        (resource.RLIMIT_CORE, 0, 0),
        # Kernel memory per uid, set here rather than inherited from the host (root's may be
        # unlimited): no locked pages (mlock, MAP_LOCKED), POSIX queues of 800 KiB in all (the
        # kernel's default), 256 queued signals (each a kernel object, RT signals queue).
        (resource.RLIMIT_MEMLOCK, 0, 0),
        (resource.RLIMIT_MSGQUEUE, 819200, 819200),
        (resource.RLIMIT_SIGPENDING, 256, 256),
    ]
    # RLIMIT_NPROC counts every process of the uid, host-wide: two Sandboxes (two runs on one
    # host) share slot uids, so one run's processes would count against the other's. The pids
    # cgroup limits the run alone; the rlimit is the fallback without cgroups.
    if spec["isolated"] and not spec["cgroups"]:
        limits.append((resource.RLIMIT_NPROC, spec["max_processes"], spec["max_processes"]))
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))


def _clean_up(spec: dict) -> None:
    """Kills what the run left in the namespace and empties the keyrings of its uids."""
    if not spec["isolated"]:
        return
    try:
        os.kill(-1, signal.SIGKILL)  # PID 1: every other process of this namespace
    except ProcessLookupError:
        pass  # none left
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    for uid in (spec["uid"], spec["checker_uid"]):
        pid = os.fork()
        if pid == 0:
            try:
                _as_uid(uid)
                _empty_keyrings()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def _status(status: int, rusage) -> dict:
    cpu = rusage.ru_utime + rusage.ru_stime
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status), "cpu_s": cpu}
    return {"exit": os.WEXITSTATUS(status), "cpu_s": cpu}


def main(spec_path: str, status_fd: int) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    for cgroup in spec["cgroups"]:  # "0": the writing process (children follow)
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
    if spec["isolated"]:
        _build_root(spec)
    else:
        _write_box(spec, "")
    python, work, box = spec["python"], spec["workdir"], spec["boxdir"]
    callee_pid = None
    if spec["checker"] is None:
        main_pid = _start(spec, spec["argv"], [0, 1, 2], spec["uid"], work)
    else:
        req_r, req_w = os.pipe()  # checker -> candidate: calls
        rep_r, rep_w = os.pipe()  # candidate -> checker: results
        null = os.open("/dev/null", os.O_RDONLY)
        wire = f"{box}/wire.py"
        callee_pid = _start(spec, [python, "-I", wire, "callee", f"{work}/solution.py"],
                            [req_r, rep_w, 2], spec["uid"], work)  # fmt: skip
        main_pid = _start(
            spec, [python, "-I", "-S", wire, "checker", f"{box}/checker/tests.json"],
            [null, 1, 2, req_w, rep_r], spec["checker_uid"], f"{box}/checker",
        )  # fmt: skip
        for fd in (req_r, req_w, rep_r, rep_w, null):
            os.close(fd)
    for fd in (0, 1):  # only the program holds stdin and stdout now (stderr: our errors too)
        os.close(fd)
    _, status, rusage = os.wait4(main_pid, 0)
    report = _status(status, rusage)
    if callee_pid is not None:  # how the candidate ended, if it did (a timeout, a crash)
        for _ in range(40 if report.get("exit") == _CANDIDATE_GONE else 1):
            pid, status, rusage = os.wait4(callee_pid, os.WNOHANG)
            if pid:
                report["candidate"] = _status(status, rusage)
                break
            time.sleep(0.005)
    _clean_up(spec)
    os.write(status_fd, json.dumps(report).encode())
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) == 3:
    main(sys.argv[1], int(sys.argv[2]))
