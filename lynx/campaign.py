"""Campaign files: subjects x prompts with shared generation settings, as YAML or JSON.

    name: spring-launch
    settings: {seed: 7, steps: 30}          # GenerationSettings for every job
    subjects:
      - id: alice                           # stable id: the same id is the same person everywhere
        photo: photos/alice.jpg             # relative to this file, absolute, or an artifact-store key
      - id: bob
        photos: [photos/bob-1.jpg, photos/bob-2.jpg]   # several photos of one person: fused identity
        consent_reference: contract 2024-113
        retention_until: 2026-01-31
    prompts:
      - a woman walking on a beach at sunset
      - text: a person cooking in a bright kitchen
        settings: {seed: 11}                # per-prompt overrides

A campaign expands to one job per subject and prompt. Errors name the file, line and field
(``campaign.yaml:12: prompts[1].settings: steps: Input should be ...``), so a typo in a 200-line
file is found at once. JSON is read by the same parser (JSON is YAML), so it gets line numbers too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lynx.errors import InputError
from lynx.jobs import GenerationRequest, GenerationSettings, SubjectSpec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CampaignPrompt(BaseModel):
    """One prompt of a campaign, with settings that differ from the campaign's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(min_length=1, max_length=4000)
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _plain_string(cls, value: Any) -> Any:
        return {"text": value} if isinstance(value, str) else value

    @field_validator("settings")
    @classmethod
    def _valid_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            GenerationSettings(**value)
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(f"{_dotted(first['loc'])}: {_message(first)}") from None
        return value


class CampaignSpec(BaseModel):
    """A validated campaign: every subject gets every prompt."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    settings: GenerationSettings = Field(default_factory=GenerationSettings)
    subjects: list[SubjectSpec] = Field(min_length=1)
    prompts: list[CampaignPrompt] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must start with a letter or digit and hold only letters, digits, '.', '_', '-'")
        return value

    @field_validator("subjects")
    @classmethod
    def _unique_subject_ids(cls, subjects: list[SubjectSpec]) -> list[SubjectSpec]:
        seen: set[str] = set()
        for subject in subjects:
            if subject.id is None:
                raise ValueError("every campaign subject needs an id")
            if subject.id in seen:
                raise ValueError(f"subject id {subject.id!r} appears twice")
            seen.add(subject.id)
        return subjects

    @field_validator("prompts")
    @classmethod
    def _unique_prompts(cls, prompts: list[CampaignPrompt]) -> list[CampaignPrompt]:
        seen: set[str] = set()
        for index, prompt in enumerate(prompts):
            if prompt.text in seen:
                raise ValueError(f"prompts[{index}] repeats an earlier prompt: {prompt.text[:60]!r}")
            seen.add(prompt.text)
        return prompts

    def settings_for(self, prompt: CampaignPrompt) -> GenerationSettings:
        merged = {**self.settings.model_dump(exclude_unset=True), **prompt.settings}
        return GenerationSettings(**merged)

    def requests(self) -> list[GenerationRequest]:
        """One request per subject x prompt, subjects outermost (a subject's jobs stay together)."""
        return [
            GenerationRequest(
                subject=subject, prompt=prompt.text, settings=self.settings_for(prompt), campaign=self.name
            )
            for subject in self.subjects
            for prompt in self.prompts
        ]


def load_campaign(path: str | Path) -> CampaignSpec:
    """Read and validate a campaign file; relative photo paths are resolved against its folder."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"campaign file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"campaign file {path} is unreadable: {err}") from None
    return parse_campaign(text, source=str(path), base_dir=path.parent)


def parse_campaign(text: str, *, source: str = "<campaign>", base_dir: Path | None = None) -> CampaignSpec:
    """Validate campaign text (YAML or JSON). Errors are ``InputError``s naming line and field."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"{where}: not valid YAML/JSON: {problem}") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: a campaign is a mapping with name, subjects and prompts")
    if base_dir is not None:
        data = _resolve_photos(data, base_dir)
    try:
        return CampaignSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(first["loc"])
        line = _line_of(root, loc)
        where = f"{source}:{line}" if line else source
        field = _dotted(loc) or "campaign"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise InputError(f"{where}: {field}: {_message(first)}{more}") from None


def _resolve_photos(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    subjects = data.get("subjects")
    if not isinstance(subjects, list):
        return data
    resolved = []
    for subject in subjects:
        if isinstance(subject, dict):
            for field in ("photo", "photos"):
                value = subject.get(field)
                if isinstance(value, str):
                    subject = {**subject, field: _resolve_photo(value, base_dir)}
                elif isinstance(value, list):
                    subject = {**subject, field: [_resolve_photo(item, base_dir) for item in value]}
        resolved.append(subject)
    return {**data, "subjects": resolved}


def _resolve_photo(photo: Any, base_dir: Path) -> Any:
    """A photo path relative to the campaign file made absolute; keys and other values as they are."""
    if not isinstance(photo, str):
        return photo
    path = Path(photo).expanduser()
    candidate = path if path.is_absolute() else base_dir / path
    return str(candidate.resolve()) if candidate.is_file() else photo


def _message(error: Any) -> str:
    message = error["msg"]
    return message.removeprefix("Value error, ")


def _dotted(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part not in ("function-after[_plain_string(), CampaignPrompt]",):
            text += f".{part}" if text else str(part)
    return text


def _line_of(node: yaml.Node | None, loc: Sequence[Any]) -> int | None:
    """1-based line of the deepest YAML node on the path ``loc`` (pydantic's error location)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((value for key, value in node.value if key.value == part), None)
            if child is None:
                break
            node = child
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            continue  # a pydantic-internal step (e.g. a validator name): stay on this node
        line = node.start_mark.line + 1
    return line
