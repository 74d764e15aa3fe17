"""Reading a campaign: a file on the worker, a file in the artifact store, or one stored by name."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from lynx.campaign import CampaignSpec, load_campaign, parse_campaign
from lynx.errors import InputError, InvalidKeyError, NotFoundError
from lynx.store import validate_key
from tasks.policy import retry_on_transient
from tasks.services import services


def read_campaign_spec(campaign_file: str | None = None, name: str | None = None) -> CampaignSpec:
    """The campaign to run. A file may be a local path or an artifact-store key (whose photos must
    then be store keys or absolute paths); with only ``name``, the spec stored by the last run of
    that campaign is used again."""
    if campaign_file:
        path = Path(campaign_file).expanduser()
        if path.is_file():
            spec = load_campaign(path)
        else:
            spec = _stored_campaign(campaign_file)
        if name and spec.name != name:
            raise InputError(f"{campaign_file} describes campaign {spec.name!r}, not {name!r}")
        return spec
    if not name:
        raise InputError("give a campaign file (campaign_file) or the name of a campaign run before")
    stored = services().tracker.get_campaign(name)
    if not stored.spec:
        raise InputError(f"campaign {name!r} has no stored spec; run it from its file")
    return CampaignSpec.model_validate(stored.spec)


def _stored_campaign(key: str) -> CampaignSpec:
    try:
        validate_key(key)
        text = services().store.get_bytes(key, max_bytes=4 * 1024 * 1024).decode("utf-8")
    except (InvalidKeyError, NotFoundError):
        raise InputError(
            f"campaign file {key!r} is neither a file on this machine nor an object in the artifact store"
        ) from None
    return parse_campaign(text, source=key)


@task(name="read-campaign", cache_policy=NONE, retry_condition_fn=retry_on_transient)
def read_campaign(campaign_file: str | None = None, name: str | None = None) -> CampaignSpec:
    """Prefect task over ``read_campaign_spec``."""
    return read_campaign_spec(campaign_file, name)
