"""``python -m xlab_chat.engines.guard COMMAND...``: run an engine server that dies with the page process.

LMDeploy's and vLLM's servers start worker processes of their own and would
outlive a page process that was killed, holding the GPU. The guard runs the
server in a process group of its own and watches its stdin, a pipe from the page
process: when the page process ends, however it ends, the pipe closes and the
guard ends the whole group. When the server exits, the guard exits with its code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading


def end_group(server: "subprocess.Popen[bytes]") -> None:
    if server.poll() is not None:
        return
    if os.name == "posix":
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(server.pid, sig)
            except ProcessLookupError:
                return
            try:
                server.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
    else:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(server.pid)], capture_output=True, check=False)


def main(command: list) -> int:
    if not command:
        print("ERROR: no command to run — use `python -m xlab_chat.engines.guard COMMAND ARGS...`", file=sys.stderr)
        return 2
    group = {"start_new_session": True} if os.name == "posix" else {
        "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
    try:
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL, **group)
    except OSError as error:
        print(f"ERROR: cannot start {command[0]!r} ({error.strerror or error}) — install the engine (see"
              " requirements.txt) or fix ENGINE_COMMAND", file=sys.stderr, flush=True)
        return 127

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the page process is gone
        end_group(server)
        os._exit(0)

    threading.Thread(target=watch_parent, name="parent", daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # ended below, outside the handler (Popen's lock is free there)
    while server.poll() is None and not stop.is_set():
        stop.wait(0.2)
    if stop.is_set():
        end_group(server)
        return 0
    return server.returncode


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not sys.exit: the parent watcher is blocked reading stdin, which aborts a normal shutdown
