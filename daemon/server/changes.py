"""Parameter changes on the compute loop: applied in the order they were acknowledged, never stalling a stream.

The IO thread validated and acknowledged each change (``pending: true``). Here a change applies at once when its
prompt is encoded already; otherwise it waits while the :class:`~.prompts.PromptWarmer` encodes the prompt (the
stream keeps going with the old one), and later changes of the same session wait behind it, so they apply in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..protocol.params import GenerationParams
from .items import LoraChoice
from .prompts import PromptWarmer
from .session import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Queued:
    session: Session
    changes: dict[str, Any]
    preset: str | None
    lora: LoraChoice | None = None


class ChangeQueue:
    """The changes not applied yet, per session in arrival order.

    ``on_applied(session, preset)`` runs after a change took effect; ``on_refused(session, message)`` when the
    engine refused it or its prompt could not be encoded (the session runs on unchanged);
    ``on_broken(session, message)`` when applying it failed unexpectedly (the loop closes that session)."""

    def __init__(
        self,
        warmer: PromptWarmer,
        *,
        on_applied: Callable[[Session, str | None], None],
        on_refused: Callable[[Session, str], None],
        on_broken: Callable[[Session, str], None],
    ) -> None:
        self.warmer = warmer
        self._on_applied = on_applied
        self._on_refused = on_refused
        self._on_broken = on_broken
        self._queued: list[_Queued] = []

    def submit(
        self, session: Session, changes: dict[str, Any], preset: str | None, lora: LoraChoice | None = None
    ) -> None:
        item = _Queued(session, changes, preset, lora)
        prompt = changes.get("prompt")
        waiting = self.pending(session) > 0
        if prompt is not None and prompt != session.params.prompt and not self.warmer.is_ready(prompt):
            self.warmer.request(prompt)
            waiting = True
        if waiting:
            self._queued.append(item)
        else:
            self._apply(item)

    def pending(self, session: Session) -> int:
        return sum(1 for q in self._queued if q.session is session)

    def planned(self, session: Session) -> GenerationParams:
        """What the session will run with once everything queued for it applies."""
        merged = session.params.model_dump()
        for q in self._queued:
            if q.session is session:
                merged.update(q.changes)
        return GenerationParams.model_validate(merged)

    def __bool__(self) -> bool:
        return bool(self._queued)

    def run(self) -> None:
        """Apply every change whose prompt is ready, in order per session (compute loop, each turn). A change whose
        prompt failed to encode is dropped and reported; the ones behind it go on."""
        still: list[_Queued] = []
        blocked: set[str] = set()
        refused: list[tuple[Session, str]] = []
        for item in self._queued:
            session = item.session
            if session.closed:
                continue
            if session.session_id in blocked:
                still.append(item)
                continue
            prompt = item.changes.get("prompt")
            if prompt is not None and not self.warmer.is_ready(prompt):
                error = self.warmer.failed(prompt)
                if error is not None:
                    refused.append((session, f"prompt could not be encoded: {error}"))
                else:
                    self.warmer.request(prompt)  # no-op while it is on its way; a retry after another's failure
                    still.append(item)
                    blocked.add(session.session_id)
                continue
            self._apply(item)
        self._queued = still
        for session, message in refused:
            self._on_refused(session, message)

    def _apply(self, item: _Queued) -> None:
        session = item.session
        try:
            set_preset = getattr(session.engine_session, "set_preset", None)  # a relay's remote applies presets itself
            set_lora = getattr(session.engine_session, "set_lora", None)  # engines with LoRA styles
            if item.preset is not None and set_preset is not None:
                with self.warmer.lock:
                    set_preset(item.preset, item.changes)
            else:
                if item.lora is not None and set_lora is not None:
                    # First: loading the file is what can fail, and then nothing has changed yet.
                    set_lora(item.lora.path, item.lora.strength, transition_chunks=item.changes.get("transition_chunks"))
                with self.warmer.lock:
                    session.engine_session.set_params(**item.changes)
        except ValueError as exc:
            self._on_refused(session, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - one session's failure must not take the others down
            log.exception("session %s: applying %s failed", session.session_id, item.changes)
            self._on_broken(session, f"parameter change failed: {type(exc).__name__}: {exc}")
            return
        if item.preset is not None:
            previous, session.preset = session.preset, item.preset
            log.info("session %s: preset %s -> %s", session.session_id, previous, item.preset)
        self._on_applied(session, item.preset)
