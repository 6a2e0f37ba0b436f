#!/usr/bin/env python3
"""calendar-sync: a tokenvault sync worker in Python (grpcio).

It leases Google access tokens from the vault for a stated purpose and scopes,
keeps them in memory only (a dict keyed by lease id), follows the vault's event
log, drops tokens on LEASE_REVOKED / SUSPENDED / CONNECTION_DELETED /
ACCOUNT_DELETED, purges what it synced for a deleted connection and
acknowledges the deletion with EventService.Ack, and releases its leases when it
stops. It never prints a token.

The gRPC stubs are generated at start, from the repository's proto/ with
grpcio-tools, into a temporary directory removed at exit: there is no generated
code to keep in step with the protos.

    python3 -m pip install -r examples/python-worker/requirements.txt
    . ./tokenvault-dev-data/dev.env      # the keys `tokenvault serve --dev` printed
    python3 examples/python-worker/worker.py --connection conn_...

`--once` is the test mode: list the services through server reflection
(v1alpha), lease one connection, wait until that connection is disconnected
(LEASE_REVOKED for the connection, then CONNECTION_DELETED), drop the token, purge,
ack, release, and exit 0; exit 1 with a message saying what did not happen.

Exit statuses: 0 done, 1 failed (the message says why), 2 bad command line,
3 a Python package is missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import os
import signal
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

try:
    import grpc
except ImportError:
    print(
        "calendar-sync: grpcio is not installed: "
        "python3 -m pip install -r examples/python-worker/requirements.txt",
        file=sys.stderr,
    )
    sys.exit(3)

NAME = "calendar-sync"
DEFAULT_PROTO_DIR = Path(__file__).resolve().parent.parent.parent / "proto"

# What `tokenvault serve --dev` prints and writes to its env file, and what the
# `tokenvault dev` commands read: the same names work here.
SERVER_ENV = "TOKENVAULT_CLI_SERVER"
WORKER_KEY_ENV = "TOKENVAULT_CLI_WORKER_KEY"
ENV_FILE_ENV = "TOKENVAULT_CLI_DEV_ENV_FILE"
DEFAULT_ENV_FILE = "./tokenvault-dev-data/dev.env"
DEFAULT_SERVER = "http://127.0.0.1:50051"

CALENDAR_EVENTS_SCOPE = "https://www.googleapis.com/auth/calendar.events"

# The four services of proto/tokenvault/v1/, as server reflection names them.
TOKENVAULT_SERVICES = (
    "tokenvault.v1.AdminService",
    "tokenvault.v1.ConnectionService",
    "tokenvault.v1.EventService",
    "tokenvault.v1.LeaseService",
)

# Calls worth retrying as they are (the vault's status conventions, common.proto).
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


class Failure(Exception):
    """Stops the worker with exit status 1 and this message."""


def say(text: str) -> None:
    """One line of what the worker did, on stdout (never a token)."""
    print(text, flush=True)


def warn(text: str) -> None:
    print(f"{NAME}: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Stubs, generated at start
# ---------------------------------------------------------------------------


def generate_stubs(proto_dir: Path, out_dir: Path) -> types.SimpleNamespace:
    """Compiles proto/tokenvault/v1/*.proto with grpcio-tools' bundled protoc
    into out_dir and imports the modules."""
    try:
        from grpc_tools import protoc
    except ImportError:
        print(
            f"{NAME}: grpcio-tools is not installed: "
            "python3 -m pip install -r examples/python-worker/requirements.txt",
            file=sys.stderr,
        )
        sys.exit(3)
    protos = sorted((proto_dir / "tokenvault" / "v1").glob("*.proto"))
    if not protos:
        raise Failure(f"no .proto files in {proto_dir / 'tokenvault' / 'v1'} (see --proto-dir)")
    # google/protobuf/timestamp.proto ships with grpcio-tools.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    # protoc writes to file descriptor 2 itself: its warnings about the protos
    # are kept back unless it fails.
    with tempfile.TemporaryFile() as messages:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(messages.fileno(), 2)
        try:
            status = protoc.main(
                [
                    "grpc_tools.protoc",
                    f"--proto_path={proto_dir}",
                    f"--proto_path={well_known}",
                    f"--python_out={out_dir}",
                    f"--grpc_python_out={out_dir}",
                    *(str(p) for p in protos),
                ]
            )
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if status != 0:
            messages.seek(0)
            sys.stderr.write(messages.read().decode(errors="replace"))
            raise Failure(
                f"generating the gRPC stubs from {proto_dir} failed (protoc exit {status})"
            )
    sys.path.insert(0, str(out_dir))
    load = lambda name: importlib.import_module(f"tokenvault.v1.{name}")  # noqa: E731
    return types.SimpleNamespace(
        common=load("common_pb2"),
        lease=load("lease_pb2"),
        lease_grpc=load("lease_pb2_grpc"),
        events=load("events_pb2"),
        events_grpc=load("events_pb2_grpc"),
    )


# ---------------------------------------------------------------------------
# Errors: the status code decides, google.rpc.ErrorInfo explains
# ---------------------------------------------------------------------------


def error_info(err: grpc.RpcError):
    """The google.rpc.ErrorInfo in the status details (grpc-status-details-bin),
    if the vault sent one and grpcio-status is installed."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status
    except ImportError:
        return None
    try:
        status = rpc_status.from_call(err)
    except Exception:  # not a call, or details that disagree with the status
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def describe(rpc: str, err: grpc.RpcError) -> str:
    """`LeaseService.LeaseToken: PERMISSION_DENIED: … (reason …, domain …)`."""
    code = err.code()
    text = f"{rpc}: {code.name if code else 'UNKNOWN'}: {err.details() or ''}".rstrip()
    info = error_info(err)
    if info is not None and info.reason:
        text += f" (reason {info.reason}" + (f", domain {info.domain})" if info.domain else ")")
    return text


def short(enum, value: int, prefix: str) -> str:
    """`EVENT_KIND_LEASE_REVOKED` -> `lease_revoked`; unknown values as numbers."""
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


# ---------------------------------------------------------------------------
# Connecting: an API key (dev vault, loopback) or a client certificate (mTLS)
# ---------------------------------------------------------------------------


def read_env_file(path: str) -> dict[str, str]:
    """The `export TOKENVAULT_CLI_*=…` lines `tokenvault serve --dev` writes."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            name, value = line[len("export ") :].split("=", 1)
            if name.startswith("TOKENVAULT_CLI_"):
                values[name] = value.strip()
    return values


def open_channel(args) -> tuple[grpc.Channel, str, tuple, str]:
    """The channel, the server's address, the metadata every call carries,
    and how we authenticate."""
    file = read_env_file(args.env_file)
    setting = lambda name: os.environ.get(name) or file.get(name)  # noqa: E731
    server = args.server or setting(SERVER_ENV) or DEFAULT_SERVER
    scheme, sep, target = server.partition("://")
    if not sep:
        scheme, target = "", server
    if scheme not in ("", "http", "https") or not target:
        raise Failure(f"--server {server!r}: expected http://HOST:PORT or https://HOST:PORT")
    tls = scheme == "https" or bool(args.ca or args.cert)
    if tls and scheme == "http":
        raise Failure(f"--server {server}: TLS (--ca/--cert) needs an https:// address")
    if bool(args.cert) != bool(args.key):
        raise Failure("--cert and --key go together")

    if tls:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(args.ca),
            private_key=read(args.key),
            certificate_chain=read(args.cert),
        )
        options = []
        if args.tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.tls_server_name))
        channel = grpc.secure_channel(target, creds, options)
    else:
        channel = grpc.insecure_channel(target)

    if args.cert:
        # The certificate's SAN is the identity; an API key would be a second one.
        return channel, server, (), f"client certificate {args.cert}"
    key = setting(args.api_key_env)
    if not key:
        raise Failure(
            f"no credentials: set {args.api_key_env} (`tokenvault serve --dev` prints it and "
            f"writes it to {DEFAULT_ENV_FILE}) or give --cert and --key for mTLS"
        )
    return channel, server, (("authorization", f"Bearer {key}"),), f"API key in {args.api_key_env}"


def list_services(channel: grpc.Channel, timeout: float) -> list[str]:
    """The services the vault lists through server reflection v1alpha."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), timeout=timeout)
    try:
        for response in responses:
            if response.HasField("error_response"):
                e = response.error_response
                raise Failure(f"reflection (v1alpha) refused: {e.error_code} {e.error_message}")
            return sorted(s.name for s in response.list_services_response.service)
    except grpc.RpcError as err:
        raise Failure(describe("ServerReflection.ServerReflectionInfo (v1alpha)", err)) from None
    finally:
        responses.cancel()
    raise Failure("reflection (v1alpha) answered nothing")


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------


@dataclass
class Lease:
    lease_id: str
    connection_id: str
    token: str = field(repr=False)  # memory only: never printed, logged or stored
    token_expires_at: float
    lease_expires_at: float


class Worker:
    def __init__(self, pb, channel: grpc.Channel, metadata: tuple, args):
        self.pb = pb
        self.args = args
        self.metadata = metadata
        self.leases_api = pb.lease_grpc.LeaseServiceStub(channel)
        self.events_api = pb.events_grpc.EventServiceStub(channel)
        self.lock = threading.Lock()
        # Every token this worker holds, by lease id; nowhere else.
        self.leases: dict[str, Lease] = {}
        # The (pretend) data synced through each connection: what a deletion purges.
        self.synced: dict[str, list[str]] = {}
        self.syncing: set[str] = set(args.connection)  # connections to sync
        self.paused: set[str] = set()  # suspended, or not leasable right now
        self.revoked: set[str] = set()  # lease ids a LEASE_REVOKED named
        self.deleted: set[str] = set()  # connections deleted: never leased again
        self.seen = 0  # highest cursor received (to resume the stream)
        self.handled = 0  # highest cursor acted on
        self.acked = 0  # the consumer's position, as far as we know
        self.stop = threading.Event()
        self.fatal: str | None = None
        self.call = None  # the open Watch stream
        # --once: what has to happen to the leased connection.
        self.once_lease: str | None = None
        self.once_revoked = False
        self.once_deleted = False
        self.once_done = threading.Event()

    # -- leasing and syncing -------------------------------------------------

    def lease(self, connection_id: str) -> Lease | None:
        request = self.pb.lease.LeaseTokenRequest(
            connection_id=connection_id,
            purpose=self.args.purpose,
            scopes=self.args.scope,
            min_valid_seconds=self.args.min_valid_seconds,
        )
        try:
            resp = self.leases_api.LeaseToken(
                request, metadata=self.metadata, timeout=self.args.rpc_timeout
            )
        except grpc.RpcError as err:
            self.lease_refused(connection_id, err)
            return None
        now = time.time()
        lease = Lease(
            lease_id=resp.lease_id,
            connection_id=connection_id,
            token=resp.access_token,
            token_expires_at=resp.token_expires_at.seconds,
            lease_expires_at=resp.lease_expires_at.seconds,
        )
        with self.lock:
            if lease.lease_id in self.revoked or connection_id in self.deleted:
                # Revoked while the answer was on its way: never use it.
                say(f"dropped {lease.lease_id} for {connection_id}: revoked before it arrived")
                return None
            self.leases[lease.lease_id] = lease
            if self.args.once:
                self.once_lease = lease.lease_id
            say(
                f"leased {lease.lease_id} for {connection_id} (purpose {self.args.purpose}, "
                f"scopes {' '.join(resp.granted_scopes)}): token expires in "
                f"{int(lease.token_expires_at - now)} s, lease ends in "
                f"{int(lease.lease_expires_at - now)} s; the token is not shown"
            )
            self.sync(lease)
        return lease

    def sync(self, lease: Lease) -> None:
        """Pretends to sync the calendar: a real worker sends the token to
        Google as `Authorization: Bearer …`. Called with the lock held, so a
        token dropped by an event is never used afterwards."""
        if lease.lease_id not in self.leases or time.time() >= lease.lease_expires_at:
            return
        _headers = {"Authorization": f"Bearer {lease.token}"}  # would go to Google
        items = self.synced.setdefault(lease.connection_id, [])
        items.append(f"calendar event {len(items) + 1}")
        say(f"synced {lease.connection_id}: {len(items)} item(s) held")

    def lease_refused(self, connection_id: str, err: grpc.RpcError) -> None:
        """What a refused LeaseToken means for this connection, by status code
        (lease.proto); the ErrorInfo reason only goes into the message."""
        code = err.code()
        text = describe("LeaseService.LeaseToken", err)
        if self.args.once:
            raise Failure(text)
        if code in RETRYABLE:
            warn(f"{text}: retrying {connection_id} on the next pass")
        elif code == grpc.StatusCode.FAILED_PRECONDITION:
            # Not ACTIVE (suspended, insufficient scope, revoked upstream,
            # deleted), or Google did not grant a scope: wait for an event.
            warn(f"{text}: pausing {connection_id} until a RESUMED or CONNECTION_UPDATED event")
            with self.lock:
                self.paused.add(connection_id)
        elif code in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.DATA_LOSS,
        ):
            # No such connection (for us), a purpose or scope the policy does not
            # allow, or a token the vault cannot decrypt: asking again cannot help.
            warn(f"{text}: no longer syncing {connection_id}")
            with self.lock:
                self.syncing.discard(connection_id)
        else:
            # UNAUTHENTICATED (bad key or certificate), INVALID_ARGUMENT (our
            # request), INTERNAL, UNIMPLEMENTED: nothing this worker can fix.
            raise Failure(text)

    def sync_pass(self) -> None:
        """Leases (or renews) and syncs every connection this worker syncs."""
        with self.lock:
            todo = sorted(self.syncing - self.paused)
        for connection_id in todo:
            with self.lock:
                held = [x for x in self.leases.values() if x.connection_id == connection_id]
                fresh = [
                    x for x in held if x.lease_expires_at - time.time() > self.args.renew_before
                ]
                if fresh:
                    self.sync(fresh[0])
                    continue
            if self.lease(connection_id) is not None:
                for old in held:
                    self.release(old.lease_id)

    def release(self, lease_id: str) -> None:
        with self.lock:
            self.leases.pop(lease_id, None)
        try:
            self.leases_api.ReleaseLease(
                self.pb.lease.ReleaseLeaseRequest(lease_id=lease_id),
                metadata=self.metadata,
                timeout=self.args.rpc_timeout,
            )
            say(f"released {lease_id}")
        except grpc.RpcError as err:
            # The token is dropped either way; the lease ends at its expiry.
            warn(describe("LeaseService.ReleaseLease", err))

    # -- events ---------------------------------------------------------------

    def watch(self) -> None:
        """Follows the event log until stopped; reconnects and resumes after
        the last cursor received when the stream breaks."""
        pb = self.pb
        backoff = 1.0
        while not self.stop.is_set():
            request = pb.events.WatchRequest(
                consumer=self.args.consumer,
                integrations=[
                    pb.common.Integration.Value(f"INTEGRATION_{self.args.integration.upper()}")
                ],
            )
            if self.seen:
                request.after_cursor = self.seen
            with self.lock:
                if self.stop.is_set():
                    return
                self.call = self.events_api.Watch(request, metadata=self.metadata)
                call = self.call
            say(
                f"watching events as consumer {self.args.consumer}"
                + (f" after #{self.seen}" if self.seen else " from its acknowledged position")
            )
            try:
                for event in call:
                    backoff = 1.0
                    self.handle(event)
                warn("EventService.Watch: the vault ended the stream; reconnecting")
            except grpc.RpcError as err:
                code = err.code()
                if self.stop.is_set() and code == grpc.StatusCode.CANCELLED:
                    return
                text = describe("EventService.Watch", err)
                if code == grpc.StatusCode.OUT_OF_RANGE and self.seen:
                    # Events after our cursor were pruned: we may have missed a
                    # deletion. Drop every token and start over from the stored position.
                    warn(
                        f"{text}: dropping every token and resuming from the acknowledged position"
                    )
                    with self.lock:
                        self.leases.clear()
                        self.seen = 0
                # INTERNAL too: grpcio reports a stream reset mid-way (a vault
                # replica going away) as INTERNAL.
                elif code not in RETRYABLE and code != grpc.StatusCode.INTERNAL:
                    self.fail(text)
                    return
                else:
                    warn(f"{text}: reconnecting in {backoff:.0f} s")
            except Failure as failure:
                self.fail(str(failure))
                return
            self.stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def handle(self, event) -> None:
        pb = self.pb
        kinds = pb.common.EventKind
        kind = short(kinds, event.kind, "EVENT_KIND_")
        conn = event.connection_id
        head = f"event #{event.cursor} {kind} {conn}"
        ack = False
        with self.lock:
            self.seen = max(self.seen, event.cursor)
            if event.kind == kinds.Value("EVENT_KIND_LEASE_REVOKED"):
                # A lease id, or (a cut-off for) every lease of the connection.
                if event.lease_id:
                    if conn in self.syncing:  # one in flight is dropped on arrival
                        self.revoked.add(event.lease_id)
                    dropped = [event.lease_id] if self.leases.pop(event.lease_id, None) else []
                else:
                    dropped = self.drop_tokens(conn)
                say(
                    f"{head} lease {event.lease_id or '(all)'}: "
                    + (
                        f"dropped the token of {', '.join(dropped)}"
                        if dropped
                        else "no token of it held here"
                    )
                )
                if (
                    self.once_lease
                    and conn in self.args.connection
                    and (event.lease_id in ("", self.once_lease))
                ):
                    self.once_revoked = self.once_lease not in self.leases
            elif event.kind in (
                kinds.Value("EVENT_KIND_CONNECTION_DELETED"),
                kinds.Value("EVENT_KIND_ACCOUNT_DELETED"),
            ):
                dropped = self.drop_tokens(conn)
                purged = self.synced.pop(conn, [])
                self.syncing.discard(conn)
                self.deleted.add(conn)
                reason = short(pb.common.DeletionReason, event.reason, "DELETION_REASON_")
                say(
                    f"{head} receipt {event.receipt_id} ({reason}): dropped {len(dropped)} "
                    f"token(s), purged {len(purged)} synced item(s)"
                )
                ack = True
            elif event.kind == kinds.Value("EVENT_KIND_SUSPENDED"):
                dropped = self.drop_tokens(conn)
                self.paused.add(conn)
                say(f"{head}: dropped {len(dropped)} token(s), paused until RESUMED")
            elif event.kind in (
                kinds.Value("EVENT_KIND_RESUMED"),
                kinds.Value("EVENT_KIND_CONNECTION_UPDATED"),
            ):
                paused = conn in self.paused
                self.paused.discard(conn)
                say(f"{head}: " + ("syncing it again" if paused else "noted"))
            else:
                say(f"{head}: not for this worker")
            self.handled = max(self.handled, event.cursor)
        if ack:
            # Acks are cumulative: this one covers every event handled before it.
            position = self.ack(event.cursor)
            if position is not None:
                say(f"acked #{event.cursor} as {self.args.consumer} (position {position})")
                if conn in self.args.connection and self.once_lease:
                    self.once_deleted = True
        if self.once_revoked and self.once_deleted:
            self.once_done.set()

    def drop_tokens(self, connection_id: str) -> list[str]:
        """Drops every token held for a connection (lock held)."""
        ids = [i for i, x in self.leases.items() if x.connection_id == connection_id]
        for i in ids:
            del self.leases[i]
        return ids

    def ack(self, cursor: int) -> int | None:
        """Acks up to `cursor`; the consumer's position, or None when the vault
        stayed unavailable (the next ack, cumulative, covers this one)."""
        request = self.pb.events.AckRequest(consumer=self.args.consumer, cursor=cursor)
        for attempt in range(4):
            try:
                resp = self.events_api.Ack(
                    request, metadata=self.metadata, timeout=self.args.rpc_timeout
                )
                self.acked = max(self.acked, resp.position)
                return resp.position
            except grpc.RpcError as err:
                text = describe("EventService.Ack", err)
                if err.code() not in RETRYABLE:
                    # PERMISSION_DENIED (not our consumer), INVALID_ARGUMENT, …
                    raise Failure(text) from None
                if attempt == 3:
                    if self.args.once:
                        raise Failure(text) from None
                    warn(f"{text}: acking #{cursor} later")
                    return None
                time.sleep(0.5 * 2**attempt)
        return None

    def fail(self, text: str) -> None:
        self.fatal = text
        self.stop.set()
        self.once_done.set()

    # -- stopping -------------------------------------------------------------

    def shutdown(self) -> None:
        """Stops watching, releases every lease still held, and acks what was
        handled since the last ack."""
        self.stop.set()
        with self.lock:
            if self.call is not None:
                self.call.cancel()
            held = list(self.leases)
        for lease_id in held:
            self.release(lease_id)
        say(f"released {len(held)} lease(s) on shutdown")
        if self.handled > self.acked and self.fatal is None:
            try:
                position = self.ack(self.handled)
                if position is not None:
                    say(f"acked #{self.handled} as {self.args.consumer} (position {position})")
            except Failure as failure:
                warn(str(failure))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(
        description="calendar-sync: an example tokenvault sync worker (Python, grpcio).",
    )
    p.add_argument(
        "--server",
        help=f"the vault's gRPC address, http:// or https:// "
        f"[default: ${SERVER_ENV}, else the env file's, else {DEFAULT_SERVER}]",
    )
    p.add_argument(
        "--env-file",
        default=os.environ.get(ENV_FILE_ENV, DEFAULT_ENV_FILE),
        help="the export lines `tokenvault serve --dev` wrote, read for every "
        f"TOKENVAULT_CLI_* variable not set [default: {DEFAULT_ENV_FILE}]",
    )
    p.add_argument(
        "--api-key-env",
        default=WORKER_KEY_ENV,
        metavar="NAME",
        help=f"the variable holding the worker's API key [default: {WORKER_KEY_ENV}]",
    )
    p.add_argument("--ca", metavar="PEM", help="CA certificate(s) to trust for the vault (TLS)")
    p.add_argument(
        "--cert", metavar="PEM", help="client certificate (mTLS; its SAN is the identity)"
    )
    p.add_argument("--key", metavar="PEM", help="the client certificate's private key")
    p.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name to check the vault's certificate against, when not the host",
    )
    p.add_argument(
        "--consumer", default="calendar-sync", help="event consumer [default: %(default)s]"
    )
    p.add_argument(
        "--purpose", default="calendar_sync", help="lease purpose [default: %(default)s]"
    )
    p.add_argument(
        "--scope",
        action="append",
        help=f"a scope to lease, repeatable [default: {CALENDAR_EVENTS_SCOPE}]",
    )
    p.add_argument(
        "--integration",
        default="calendar",
        choices=["calendar", "email"],
        help="only this integration's events [default: %(default)s]",
    )
    p.add_argument(
        "--connection",
        action="append",
        default=[],
        metavar="ID",
        help="a connection to sync, repeatable",
    )
    p.add_argument(
        "--min-valid-seconds",
        type=int,
        default=0,
        help="the leased token stays valid this long (0: the vault's default)",
    )
    p.add_argument(
        "--renew-before",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="lease again when a lease ends sooner than this [default: %(default)s]",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="between sync passes [default: %(default)s]",
    )
    p.add_argument(
        "--rpc-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="deadline of each unary call [default: %(default)s]",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="test mode: reflection, one lease, wait for its connection's deletion, exit",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="--once: give up after this long [default: %(default)s]",
    )
    p.add_argument(
        "--proto-dir",
        type=Path,
        default=DEFAULT_PROTO_DIR,
        help="the directory holding tokenvault/v1/*.proto [default: the repository's]",
    )
    args = p.parse_args(argv)
    args.scope = args.scope or [CALENDAR_EVENTS_SCOPE]
    if args.once and len(args.connection) != 1:
        p.error("--once needs exactly one --connection")
    return args


def run(args, pb) -> None:
    channel, server, metadata, auth = open_channel(args)
    with channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.rpc_timeout)
        except grpc.FutureTimeoutError:
            raise Failure(
                f"no connection to the vault at {server} within {args.rpc_timeout:.0f} s: "
                "is it running, and for TLS, do --ca, --cert/--key and --tls-server-name fit?"
            ) from None
        say(f"{NAME}: connected to {server}, authenticating with the {auth}")
        worker = Worker(pb, channel, metadata, args)
        stop_on_signal(worker)

        if args.once:
            services = list_services(channel, args.rpc_timeout)
            missing = [s for s in TOKENVAULT_SERVICES if s not in services]
            if missing:
                raise Failure(
                    f"reflection (v1alpha) does not list {', '.join(missing)}; "
                    f"it lists {', '.join(services)}"
                )
            listed = ", ".join(TOKENVAULT_SERVICES)
            say(f"reflection (v1alpha) lists the tokenvault services: {listed}")

        watcher = threading.Thread(target=worker.watch, name="watch", daemon=True)
        watcher.start()
        done = None
        try:
            if args.once:
                done = run_once(worker, args)
            else:
                while not worker.stop.is_set():
                    worker.sync_pass()
                    worker.stop.wait(args.interval)
        finally:
            worker.shutdown()
            watcher.join(timeout=5)
        if worker.fatal:
            raise Failure(worker.fatal)
        if done:
            say(done)


def run_once(worker: Worker, args) -> str | None:
    """Leases the one connection and waits for its deletion; what to print
    once the worker has shut down."""
    connection_id = args.connection[0]
    deadline = time.monotonic() + args.timeout
    if worker.lease(connection_id) is None:
        raise Failure(f"the lease of {connection_id} was revoked before it could be used")
    while not worker.once_done.is_set():
        left = deadline - time.monotonic()
        if left <= 0 or worker.stop.is_set():
            break
        worker.once_done.wait(min(left, 0.5))
    if worker.fatal:
        return None  # run() raises it
    if not worker.once_done.is_set():
        missing = []
        if not worker.once_revoked:
            missing.append(f"LEASE_REVOKED for {worker.once_lease}")
        if not worker.once_deleted:
            missing.append(f"CONNECTION_DELETED (purged and acked) for {connection_id}")
        why = "interrupted" if worker.stop.is_set() else f"timed out after {args.timeout:.0f} s"
        raise Failure(f"--once: {why} waiting for {' and '.join(missing)}")
    return (
        f"once: ok: leased {worker.once_lease}, saw it revoked and {connection_id} deleted, "
        f"dropped the token, purged and acked #{worker.acked}"
    )


def stop_on_signal(worker: Worker) -> None:
    def stop(signum, _frame):
        warn(f"{signal.Signals(signum).name}: stopping")
        worker.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="tokenvault-worker-stubs-") as stubs:
            pb = generate_stubs(args.proto_dir.resolve(), Path(stubs))
            run(args, pb)
    except Failure as failure:
        warn(f"failed: {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
