"""lorakit serve's request schema and sampling, without a server: what is refused, what each
refusal says, and that a row of bad logits gets no token instead of stopping its batch."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.serve import protocol as api
from lorakit.serve.sampling import SamplingParams, new_generator, next_tokens, sample

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def _refusal(body: dict | bytes, model: type = api.ChatRequest) -> api.ApiError:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(api.ApiError) as error:
        api.parse(data, model)
    assert error.value.status == 400
    return error.value


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"max_token": 5}, "max_token", "Unknown field 'max_token'; did you mean 'max_tokens'?"),
        ({"temprature": 0}, "temprature", "'temprature'; did you mean 'temperature'?"),
        (
            {"stream_options": {"include_usge": True}},
            "stream_options.include_usge",
            "did you mean 'include_usage'?",
        ),
        ({"fooo": 1}, "fooo", "Unknown field 'fooo'; known fields: model, max_tokens, temperature"),
    ],
)
def test_an_unknown_field_gets_the_nearest_known_name(extra, param, message):
    error = _refusal(CHAT | extra)
    assert message in error.message and error.param == param


def test_an_unknown_field_in_a_message_is_matched_against_message_fields():
    body = CHAT | {"messages": [{"role": "user", "content": "hi", "nme": "x"}]}
    assert "Unknown field 'messages.0.nme'; did you mean 'name'?" in _refusal(body).message
    parts = [{"type": "text", "text": "hi", "txt": 1}]
    body = CHAT | {"messages": [{"role": "user", "content": parts}]}
    message = _refusal(body).message  # no union member's tag, no "should be a string"
    assert message == "Unknown field 'messages.0.content.0.txt'; did you mean 'text'?"


def test_a_huge_unknown_field_name_is_cut_in_the_message():
    message = _refusal(CHAT | {"x" * 100_000: 1}).message
    assert len(message) < 1000 and message.startswith("Unknown field 'xxx")


@pytest.mark.parametrize("temperature", [1e-300, 1e-9, 0.009])
def test_temperatures_that_overflow_the_logits_are_refused(temperature):
    error = _refusal(CHAT | {"temperature": temperature})
    assert error.param == "temperature"
    assert "must be 0 (greedy) or from 0.01 to 2" in error.message


@pytest.mark.parametrize("temperature", [0, 0.01, 1, 2])
def test_temperatures_from_0_01_to_2_and_0_are_accepted(temperature):
    assert api.parse(json.dumps(CHAT | {"temperature": temperature}), api.ChatRequest)


@pytest.mark.parametrize(
    ("seed", "ok"),
    [(-(2**63), True), (2**64 - 1, True), (-(2**63) - 1, False), (2**64, False), (10**40, False)],
)
def test_seeds_must_fit_a_torch_generator(seed, ok):
    body = json.dumps(CHAT | {"seed": seed})
    if ok:
        request = api.parse(body, api.ChatRequest)
        assert new_generator(request.seed).initial_seed() == seed % 2**64
    else:
        error = _refusal(CHAT | {"seed": seed})
        assert error.param == "seed" and error.message.startswith("seed: Input should be")


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_refused_by_name(value):
    body = b'{"model": "a", "prompt": "x", "top_p": ' + value + b"}"
    error = _refusal(body, api.CompletionRequest)
    assert error.param == "top_p" and "finite number" in error.message


def test_stop_strings_are_bounded_in_number_and_length():
    assert _refusal(CHAT | {"stop": ["x"] * 5}).message == (
        "stop: List should have at most 4 items after validation, not 5."
    )
    long = "y" * (api.MAX_STOP_CHARS + 1)
    assert _refusal(CHAT | {"stop": long}).message == (
        "stop: String should have at most 1000 characters."
    )
    error = _refusal(CHAT | {"stop": ["ok", long]})
    assert error.message == "stop.1: String should have at most 1000 characters."
    assert error.param == "stop.1"
    assert api.parse(json.dumps(CHAT | {"stop": ["y" * api.MAX_STOP_CHARS]}), api.ChatRequest)


def test_new_status_codes_have_openai_error_types():
    assert api.ApiError(401, "no key", code="invalid_api_key").body() == {
        "error": {
            "message": "no key",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert api.ApiError(413, "big").body()["error"]["type"] == "invalid_request_error"


# --- sampling -------------------------------------------------------------------------------
def test_a_row_of_non_finite_logits_gets_no_token_and_the_others_are_unchanged():
    logits = torch.tensor(
        [
            [0.0, 3.0, 1.0],
            [float("nan"), 1.0, 0.0],  # argmax would pick the NaN
            [1.0, float("inf"), 0.0],
            [5.0, 0.0, 0.0],
        ]
    )
    greedy, sampled = SamplingParams(4, temperature=0), SamplingParams(4, temperature=1, seed=3)
    params = [greedy, greedy, sampled, sampled]
    tokens = next_tokens(logits, params, [new_generator(p.seed) for p in params])
    alone = sample(logits[3], 1.0, 1.0, new_generator(3))
    assert tokens == [1, None, None, alone]


def test_sampling_refuses_logits_that_overflow_once_scaled():
    huge = torch.tensor([3e38, 0.0, -1.0])  # finite, but / 0.5 overflows float32
    assert sample(huge, 0.5, 1.0, new_generator(0)) is None
    assert sample(huge, 1.0, 1.0, new_generator(0)) == 0


def test_a_top_p_that_is_zero_in_float32_keeps_the_most_likely_token():
    logits = torch.tensor([0.5, 2.0, 1.0])
    assert all(sample(logits, 1.0, 1e-300, new_generator(s)) == 1 for s in range(20))


def test_masked_tokens_at_minus_infinity_are_fine_but_a_row_of_them_is_not():
    inf = float("inf")
    logits = torch.tensor([[-inf, 2.0, -inf], [-inf, -inf, -inf], [-inf, 0.0, -inf]])
    params = [SamplingParams(4, temperature=0), SamplingParams(4, temperature=0)]
    params.append(SamplingParams(4, temperature=1.0, seed=0))
    assert next_tokens(logits, params, [new_generator(0)] * 3) == [1, None, 1]


def test_an_adapter_name_is_bounded():
    """A name is listed in every 404: one load must not make them megabytes."""
    body = {"lora_name": "x" * (api.MAX_ADAPTER_NAME + 1), "lora_path": "/a"}
    assert "lora_name" in _refusal(body, api.LoadAdapter).message
    name = "x" * api.MAX_ADAPTER_NAME
    assert (
        api.parse(json.dumps({**body, "lora_name": name}).encode(), api.LoadAdapter).lora_name
        == name
    )
