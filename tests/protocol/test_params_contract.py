"""One definition of the generation parameters: the bounds a client sees in the protocol's schema are the engine's
and the presets', and they are the numbers in protocol/constants.py (which the OBS script reads)."""

from __future__ import annotations

import pytest

from sdlive.daemon.engine import SessionParams
from sdlive.daemon.presets import Preset
from sdlive.daemon.protocol import constants
from sdlive.daemon.protocol.messages import OpenSessionRequest, ParamsUpdate, SetParamsRequest
from sdlive.daemon.protocol.params import GenerationParams, StyleParams

BOUND_KEYS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength")


def bounds(model: type, field: str) -> dict[str, object]:
    """A field's type and bounds in the model's JSON schema (what a client in any language sees), None unwrapped."""
    prop = model.model_json_schema()["properties"][field]
    if "anyOf" in prop:  # an optional field: the non-null branch
        (prop,) = [p for p in prop["anyOf"] if p.get("type") != "null"]
    return {key: prop[key] for key in BOUND_KEYS if key in prop}


@pytest.mark.parametrize("field", constants.STYLE_FIELDS)
def test_client_schema_engine_and_presets_agree_on_every_style_field(field):
    engine = bounds(SessionParams, field)
    assert engine, f"{field} has no schema"
    for model in (SetParamsRequest, ParamsUpdate, Preset, GenerationParams, StyleParams):
        assert bounds(model, field) == engine, f"{model.__name__}.{field}"


def test_stream_batch_is_chosen_at_open_session_only():
    assert bounds(ParamsUpdate, "stream_batch") == bounds(SessionParams, "stream_batch") == {"type": "boolean"}
    assert "stream_batch" not in SetParamsRequest.model_fields
    assert "params" in OpenSessionRequest.model_fields


def test_the_bounds_are_the_constants():
    assert bounds(SessionParams, "steps") == {"type": "integer", "minimum": constants.STEPS_MIN, "maximum": constants.STEPS_MAX}
    assert bounds(SessionParams, "noise_scale") == {
        "type": "number",
        "exclusiveMinimum": constants.NOISE_SCALE_MIN_EXCLUSIVE,
        "maximum": constants.NOISE_SCALE_MAX,
    }
    assert bounds(SessionParams, "prompt") == {"type": "string", "minLength": 1, "maxLength": constants.PROMPT_MAX_CHARS}
    assert bounds(SessionParams, "seed") == {
        "type": "integer", "minimum": 0, "exclusiveMaximum": constants.SEED_MAX_EXCLUSIVE,
    }  # fmt: skip
    assert bounds(SessionParams, "transition_chunks")["maximum"] == constants.TRANSITION_CHUNKS_MAX


def test_the_defaults_are_the_constants():
    defaults = SessionParams()
    assert (defaults.prompt, defaults.steps, defaults.noise_scale, defaults.seed, defaults.transition_chunks) == (
        constants.DEFAULT_PROMPT,
        constants.DEFAULT_STEPS,
        constants.DEFAULT_NOISE_SCALE,
        constants.DEFAULT_SEED,
        constants.DEFAULT_TRANSITION_CHUNKS,
    )
    assert tuple(SessionParams.model_fields) == constants.PARAM_FIELDS


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", constants.STEPS_MAX + 1), ("noise_scale", 0.0), ("prompt", "x" * (constants.PROMPT_MAX_CHARS + 1))],
)
def test_a_value_out_of_bounds_fails_the_same_way_everywhere(field, value):
    for build in (
        lambda: SessionParams(**{field: value}),
        lambda: SetParamsRequest(session_id="s", **{field: value}),
        lambda: Preset(name="p", prompt="a prompt", **{field: value}) if field != "prompt" else Preset(name="p", prompt=value),
    ):
        with pytest.raises(ValueError, match=field):
            build()
