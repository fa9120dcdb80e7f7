"""Which LoRA adapter answers a request: registry aliases, polled, loaded, switched atomically.

`AdapterRouter` polls `models:/<name>@champion` and `@challenger` (with the live canary's share, from
the registered model's `canary.*` tags) every `poll_interval_s`. When an alias moves it downloads the new version, loads it on the backend
(under a PEFT name that carries the version), and only then replaces the routing table in one
assignment. A request reads the table once when it is admitted and keeps the adapter it got, so
requests in flight when the champion moves finish on the old one; an old adapter is unloaded only
when no admitted request still holds it. No alias yet (or MLflow unreachable at start) -> base.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from training import registry

log = logging.getLogger("serving.adapters")


class AdapterBackend(Protocol):
    def load_adapter(self, name: str, folder: str | Path) -> None: ...
    def unload_adapter(self, name: str) -> None: ...


class UnknownAdapter(LookupError):
    """A request named an adapter version that the registry does not have or that cannot load."""


@dataclass(frozen=True)
class Served:
    """A loaded adapter: its registry reference and backend name."""

    ref: registry.AdapterRef
    name: str  # backend (PEFT / vLLM) adapter name

    @property
    def label(self) -> str:
        return self.ref.label


@dataclass(frozen=True)
class Routes:
    champion: Served | None = None
    challenger: Served | None = None


@dataclass
class Choice:
    """What one request is answered with; `release()` when it is done."""

    served: Served | None
    arm: str  # base | champion | challenger | explicit
    _router: AdapterRouter | None = field(default=None, repr=False)

    @property
    def name(self) -> str | None:
        return self.served.name if self.served else None

    @property
    def label(self) -> str | None:
        return self.served.label if self.served else None

    def release(self) -> None:
        if self._router is not None and self.served is not None:
            self._router._release(self.served.name)
            self._router = None


def _check_base(folder: Path, base_model: str) -> None:
    sidecar = registry.read_sidecar(folder)
    trained_on = sidecar.get("base_model")
    if trained_on and trained_on != base_model:
        raise UnknownAdapter(f"adapter in {folder} was trained on base model {trained_on!r}, but this server "
                             f"serves {base_model!r}; register it for the right base or change model.base")


class AdapterRouter:
    def __init__(self, backend: AdapterBackend, base_model: str, model_name: str, adapters_dir: Path,
                 champion_alias: str = "champion", challenger_alias: str = "challenger",
                 challenger_share: float = 0.0, max_loaded: int = 4, prefetch: bool = True,
                 name_fn=None):  # noqa: ANN001
        from serving.engine import adapter_name

        self.backend = backend
        self.base_model = base_model
        self.model_name = model_name
        self.adapters_dir = Path(adapters_dir)
        self.champion_alias = champion_alias
        self.challenger_alias = challenger_alias
        self.challenger_share = challenger_share
        self.max_loaded = max_loaded
        self.prefetch = prefetch
        self._challenger_version: str | None = None
        self.canary_share = challenger_share  # the share in force, updated at each refresh
        self.name_fn = name_fn or adapter_name
        self.routes = Routes()
        self.loaded: dict[str, Served] = {}  # backend name -> Served
        self._refs: dict[str, int] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.switches: list[dict] = []  # history: when each alias moved, and how long the switch took

    # --- loading ------------------------------------------------------------------------------

    def ensure_loaded(self, ref: registry.AdapterRef) -> Served:
        name = self.name_fn(ref.label)
        with self._load_lock:
            if name in self.loaded:
                return self.loaded[name]
            folder = registry.download(ref, self.adapters_dir)
            _check_base(folder, self.base_model)
            self.backend.load_adapter(name, folder)
            served = Served(ref=ref, name=name)
            self.loaded[name] = served
            return served

    def _try_load(self, ref: registry.AdapterRef) -> Served | None:
        try:
            return self.ensure_loaded(ref)
        except Exception as e:  # noqa: BLE001 - a broken challenger must not stop champion updates
            self.last_error = f"challenger {ref.label}: {type(e).__name__}: {e}"
            log.warning("cannot load challenger %s: %s", ref.label, e)
            return None

    def refresh(self) -> Routes:
        """Resolve the aliases once and switch the routes if they moved (also called by the poller)."""
        t0 = time.perf_counter()
        old = self.routes
        champion = registry.resolve(self.champion_alias, name=self.model_name)
        challenger = registry.resolve(self.challenger_alias, name=self.model_name)
        new_champion = self.ensure_loaded(champion) if champion else None
        # The challenger is loaded even when it gets no traffic: it is the next champion, and a
        # promotion then only swaps the routing table (no download or load on the critical path).
        share = self.live_share(challenger)
        new_challenger = self._try_load(challenger) if challenger and (self.prefetch or share > 0) else None
        self._challenger_version = challenger.version if challenger else None
        new = Routes(champion=new_champion, challenger=new_challenger if share > 0 else None)
        if new != old:
            if hasattr(self.backend, "set_hot") and new.champion != old.champion:
                # merge the new champion first; batches on the old one fall back to the stacked path
                self.backend.set_hot(new.champion.name if new.champion else None)
            self.routes = new  # one assignment: requests see the old table or the new one, never a mix
            self.switches.append({"at": time.time(), "seconds": time.perf_counter() - t0,
                                  "champion": new.champion.label if new.champion else None,
                                  "challenger": new.challenger.label if new.challenger else None})
            log.info("routes now champion=%s challenger=%s", self.switches[-1]["champion"],
                     self.switches[-1]["challenger"])
            self._gc()
        return new

    def live_share(self, challenger: registry.AdapterRef | None) -> float:
        """The challenger's share of users: the live canary's (registry tags) when one runs for this very
        version, else the configured `challenger_share`. Read at every poll, so a canary that starts, changes
        share or ends (rollout) reaches every replica without a restart."""
        if challenger is None:
            self.canary_share = 0.0
            return 0.0
        live = registry.canary(self.model_name)
        share = live.share if live is not None and live.version == challenger.version else self.challenger_share
        self.canary_share = min(1.0, max(0.0, share))
        return self.canary_share

    def _gc(self) -> None:
        """Unload adapters that nothing routes to and no request holds, beyond `max_loaded`."""
        routed = {s.name for s in (self.routes.champion, self.routes.challenger) if s}
        if self.prefetch:  # keep the prefetched challenger too
            routed |= {n for n, s in self.loaded.items() if s.ref.version == self._challenger_version}
        with self._lock:
            idle = [n for n in self.loaded if n not in routed and self._refs.get(n, 0) == 0]
        for name in idle[: max(0, len(self.loaded) - self.max_loaded)]:
            with self._lock:
                if self._refs.get(name, 0):
                    continue
                self.loaded.pop(name, None)
            self.backend.unload_adapter(name)

    # --- choosing -----------------------------------------------------------------------------

    def choose(self, user_id: str, explicit: str | None = None) -> Choice:
        """Pick the adapter for a request and hold it until `Choice.release()`."""
        if explicit is not None:
            served = self._explicit(explicit)
            arm = "explicit"
        else:
            routes = self.routes
            if routes.challenger and self._in_challenger_share(user_id):
                served, arm = routes.challenger, "challenger"
            elif routes.champion:
                served, arm = routes.champion, "champion"
            else:
                served, arm = None, "base"
        if served is not None:
            with self._lock:
                self._refs[served.name] = self._refs.get(served.name, 0) + 1
        return Choice(served=served, arm=arm, _router=self)

    def _release(self, name: str) -> None:
        with self._lock:
            self._refs[name] = max(0, self._refs.get(name, 0) - 1)

    def _in_challenger_share(self, user_id: str) -> bool:
        # Sticky per user: the same user always lands in the same arm, so their feedback is comparable.
        h = int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:8], "big") / 2**64
        return h < self.canary_share

    def _explicit(self, wanted: str) -> Served | None:
        """`base`, a version (`3`), a label (`flywheel-assistant/3`) or an alias (`champion`)."""
        if wanted in ("base", self.base_model):
            return None
        if wanted in (self.champion_alias, self.challenger_alias):
            s = getattr(self.routes, "champion" if wanted == self.champion_alias else "challenger")
            if s is None:
                raise UnknownAdapter(f"no adapter holds the alias {wanted!r} yet; use adapter='base'")
            return s
        version = wanted
        if "/" in wanted:
            name, _, version = wanted.rpartition("/")
            if name != self.model_name:
                raise UnknownAdapter(f"adapter {wanted!r} is not a version of {self.model_name!r}")
        if not version.isdigit():
            raise UnknownAdapter(f"adapter {wanted!r} is not 'base', an alias, a version number or "
                                 f"'{self.model_name}/<version>'")
        for s in list(self.loaded.values()):
            if s.ref.version == version:
                return s
        try:
            ref = registry.resolve(version, name=self.model_name)
        except Exception as e:  # noqa: BLE001 - registry unreachable
            raise UnknownAdapter(f"cannot look up adapter version {version} in the registry: {e}") from e
        if ref is None:
            raise UnknownAdapter(f"adapter version {version} of {self.model_name!r} is not registered")
        try:
            return self.ensure_loaded(ref)
        except UnknownAdapter:
            raise
        except Exception as e:  # noqa: BLE001 - load failure is the request's problem, not the server's
            raise UnknownAdapter(f"adapter {ref.label} cannot be served: {e}") from e

    # --- polling ------------------------------------------------------------------------------

    def start(self, poll_interval_s: float, wait_s: float = 15.0) -> None:
        """Poll in the background; wait up to `wait_s` for the first answer so a healthy registry's
        champion is served from the first request, but never let a dead MLflow block start-up."""
        first = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(poll_interval_s, first), name="serving-adapters",
                                        daemon=True)
        self._thread.start()
        if not first.wait(wait_s):
            log.warning("registry did not answer within %.0fs; serving the base model until it does", wait_s)

    def _poll(self, interval: float, first: threading.Event) -> None:
        while True:
            try:
                self.refresh()
                if self.last_error:
                    log.info("registry reachable again")
                self.last_error = None
            except Exception as e:  # noqa: BLE001 - keep serving what we have
                error = f"{type(e).__name__}: {e}"
                if error != self.last_error:  # once per distinct failure, not every poll
                    log.warning("adapter refresh failed (keeping the current routes): %s", error)
                self.last_error = error
            first.set()
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def state(self) -> dict:
        r = self.routes
        return {"champion": r.champion.label if r.champion else None,
                "challenger": r.challenger.label if r.challenger else None,
                "challenger_share": self.canary_share,
                "loaded": sorted(s.label for s in self.loaded.values()),
                "last_error": self.last_error, "switches": len(self.switches)}
