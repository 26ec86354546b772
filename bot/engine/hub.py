"""Whether a Hugging Face model id may ask the hub, decided before transformers does.

Why: when the hub cannot be reached, huggingface_hub retries each request with backoff before it falls back
to the cache. Measured (transformers 5.24, huggingface_hub 2.4, endpoint at a refused port): a model that is
not cached failed after 48 s, one that IS cached loaded after 116 s. Against a listener that never answers (a
network that drops replies) both hung for good, in `HfApi.model_info`, which has no timeout. One short
request to the endpoint decides instead: unreachable, a cached model loads from the cache alone and a
missing one is one clear line; a hub that answers is left to transformers (downloads, newer revisions).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from bot.config import MODEL_FILES
from bot.engine.base import EngineError

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT = 3.0  # seconds the hub has to answer before the cache alone is used


def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """None when `endpoint` answers one HEAD request within `timeout` seconds, else why not.

    Any status counts as an answer but a proxy's 407 (it wants credentials we do not have) and a 5xx (a
    proxy or gateway that cannot reach the hub, or the hub down): huggingface_hub retries those with backoff
    too. The request goes through huggingface_hub's own HTTP client (its proxies and certificates) on a daemon
    thread, so a name lookup that hangs, which no HTTP timeout bounds, cannot hold the load either."""
    from huggingface_hub.utils import get_session

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            response = get_session().head(endpoint, timeout=timeout + 1)  # the join below gives up first
        except Exception as exc:  # refused, no such host, TLS failure: all mean "not reachable" here
            outcome.append(" ".join(str(exc).split()) or type(exc).__name__)
            return
        status = response.status_code
        answered = f"it answered {status} {response.reason_phrase}".rstrip()
        outcome.append(answered if status == 407 or status >= 500 else None)

    thread = threading.Thread(target=probe, name="hermes-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer in {timeout:g} s"


def check_hub_id(repo_id: str, *, setting: str = "HERMES_MODEL") -> None:
    """EngineError for a value no hub id can be (`models/hermes/v2`, a relative folder without `./` that does not
    exist; `C:\\models\\hermes`): huggingface_hub's HFValidationError was a traceback."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise EngineError(
            f"{setting}={repo_id} is neither an existing folder nor a valid Hugging Face id (owner/name); "
            "a local folder starts with /, ./, ../ or ~/"
        ) from None


def cache_only(repo_id: str, *, setting: str = "HERMES_MODEL", needs: tuple[str, ...] = MODEL_FILES) -> bool:
    """True when the hub id `repo_id` is to load from the local cache alone (`offline_hub`): HF_HUB_OFFLINE
    is set (then no request at all), or the hub endpoint does not answer. False when it answers: transformers
    downloads and updates as usual. EngineError, at once, when the cache alone is to serve and holds none of
    `needs` for it; `setting` is where the id came from (`--model` for `hermes-bot prompt`), for messages."""
    from huggingface_hub import constants, try_to_load_from_cache

    check_hub_id(repo_id, setting=setting)
    if constants.HF_HUB_OFFLINE:
        why, fix = "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE and run once with the hub reachable to download it"
    else:
        problem = hub_unreachable(constants.ENDPOINT, HUB_PROBE_TIMEOUT)  # read now: tests shorten it
        if problem is None:
            return False
        why = f"the hub at {constants.ENDPOINT} cannot be reached ({problem})"
        fix = "run once with the hub reachable to download it (then HF_HUB_OFFLINE=1 starts without asking the hub)"
    if not any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in needs):
        raise EngineError(
            f"cannot load {setting}={repo_id!r}: it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and {why}; set {setting} to a local model folder, or {fix}"
        )
    if not constants.HF_HUB_OFFLINE:
        log.warning("%s: %s=%s loads from the local cache, without checking for a newer revision",
                    why, setting, repo_id)
    return True


@contextmanager
def offline_hub(on: bool = True) -> Iterator[None]:
    """huggingface_hub's offline mode (HF_HUB_OFFLINE) for the block: transformers then reads only the cache
    (its `local_files_only`), and no request leaves, not even those that flag does not cover (huggingface_hub
    fetches its agent registry from the endpoint, 3 s against a silent one, for the headers of a cache read)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or on
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
