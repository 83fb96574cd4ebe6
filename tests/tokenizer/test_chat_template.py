"""The chat format: template == Python renderer == a transcription of nanochat's render_conversation."""

from __future__ import annotations

import copy
import random

import pytest
from jinja2.exceptions import TemplateError
from tokenizer_testdata import MULTILINGUAL

from modeling_nanochat.tokenization_nanochat import (
    SPECIAL_TOKENS,
    ChatFormatError,
    encode_texts,
    normalize_conversation,
    render_conversation,
    render_for_completion,
)


def spec_render(tokenizer, conversation, max_tokens=2048):
    """nanochat's render_conversation (spec §4.6) written out independently, on nanochat-shape input.

    Encodes with tiktoken's encode_ordinary on the same ranks when tiktoken is installed (as nanochat does),
    else with the HF backend.
    """
    try:
        from modeling_nanochat.tokenization_nanochat import to_tiktoken

        enc = to_tiktoken(tokenizer)
        encode = enc.encode_ordinary
    except ImportError:
        def encode(text):
            return encode_texts(tokenizer, [text])[0]

    def special(name):
        return tokenizer.convert_tokens_to_ids(name)

    ids, mask = [], []

    def add_tokens(token_ids, m):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ids.extend(token_ids)
        mask.extend([m] * len(token_ids))

    if conversation["messages"][0]["role"] == "system":
        conversation = copy.deepcopy(conversation)
        messages = conversation["messages"]
        assert messages[1]["role"] == "user"
        messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = messages[1:]
    else:
        messages = conversation["messages"]
    assert len(messages) >= 1
    add_tokens(special("<|bos|>"), 0)
    for i, message in enumerate(messages):
        assert message["role"] == ("user" if i % 2 == 0 else "assistant")
        content = message["content"]
        if message["role"] == "user":
            assert isinstance(content, str)
            add_tokens(special("<|user_start|>"), 0)
            add_tokens(encode(content), 0)
            add_tokens(special("<|user_end|>"), 0)
        else:
            add_tokens(special("<|assistant_start|>"), 0)
            if isinstance(content, str):
                add_tokens(encode(content), 1)
            else:
                for part in content:
                    value_ids = encode(part["text"])
                    if part["type"] == "text":
                        add_tokens(value_ids, 1)
                    elif part["type"] == "python":
                        add_tokens(special("<|python_start|>"), 1)
                        add_tokens(value_ids, 1)
                        add_tokens(special("<|python_end|>"), 1)
                    elif part["type"] == "python_output":
                        add_tokens(special("<|output_start|>"), 0)
                        add_tokens(value_ids, 0)
                        add_tokens(special("<|output_end|>"), 0)
                    else:
                        raise ValueError(part["type"])
            add_tokens(special("<|assistant_end|>"), 1)
    return ids[:max_tokens], mask[:max_tokens]


def template_render(tokenizer, messages, max_tokens=None, **kwargs):
    truncation = {"truncation": True, "max_length": max_tokens} if max_tokens else {}
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **truncation, **kwargs
    )
    return out["input_ids"], out["assistant_masks"]


WORDS = MULTILINGUAL.split(" ") + ["", " ", "\n", "\n\n", "k.", "Let", "me", "12", "345", "=", "'s", "é"]


def random_text(rng, long=False):
    n = rng.randint(300, 900) if long else rng.choice([0, 1, 2, 5, 12, 30])
    sep = rng.choice([" ", "", "\n"])
    return sep.join(rng.choice(WORDS) for _ in range(n))


def random_conversation(rng):
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": random_text(rng)})
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": random_text(rng, long=rng.random() < 0.1)})
        if rng.random() < 0.5:
            content = random_text(rng, long=rng.random() < 0.1)
        else:
            content = [
                {"type": rng.choice(["text", "text", "python", "python_output"]), "text": random_text(rng)}
                for _ in range(rng.randint(0, 6))
            ]
        messages.append({"role": "assistant", "content": content})
    if rng.random() < 0.2:
        messages.pop()  # conversations may end on a user message
    return {"messages": messages}


CONVERSATIONS = [random_conversation(random.Random(seed)) for seed in range(150)]


def test_corpus_covers_the_hard_cases():
    flat = [m for c in CONVERSATIONS for m in c["messages"]]
    parts = [p for m in flat if isinstance(m["content"], list) for p in m["content"]]
    assert sum(m["role"] == "system" for m in flat) > 20
    assert {p["type"] for p in parts} == {"text", "python", "python_output"}
    assert any(m["content"] == "" for m in flat) and any(p["text"] == "" for p in parts)
    adjacent_text = any(
        a["type"] == b["type"] == "text" and a["text"] and b["text"]
        for m in flat if isinstance(m["content"], list) for a, b in zip(m["content"], m["content"][1:])
    )
    assert adjacent_text


@pytest.mark.parametrize("max_tokens", [2048, 200])
def test_template_and_renderer_equal_the_spec_on_a_corpus(tokenizer, max_tokens):
    truncated = 0
    for conversation in CONVERSATIONS:
        expected = spec_render(tokenizer, conversation, max_tokens=max_tokens)
        assert render_conversation(tokenizer, conversation, max_tokens=max_tokens) == expected
        assert template_render(tokenizer, conversation["messages"], max_tokens=max_tokens) == expected
        full = spec_render(tokenizer, conversation, max_tokens=10**9)
        truncated += len(full[0]) > max_tokens
    assert truncated > 0  # the corpus really exercises truncation


def test_masks_by_hand(tokenizer):
    def tid(name):
        return tokenizer.convert_tokens_to_ids(name)

    def enc(text):
        return encode_texts(tokenizer, [text])[0]

    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ]},
    ]
    user = enc("Be brief.\n\n2+2?")
    expected_ids = (
        [tid("<|bos|>"), tid("<|user_start|>"), *user, tid("<|user_end|>"), tid("<|assistant_start|>")]
        + enc("Let me check.") + [tid("<|python_start|>"), *enc("2+2"), tid("<|python_end|>")]
        + [tid("<|output_start|>"), *enc("4"), tid("<|output_end|>")] + enc("It is 4.") + [tid("<|assistant_end|>")]
    )
    expected_mask = (
        [0] * (len(user) + 4) + [1] * len(enc("Let me check.")) + [1] * (len(enc("2+2")) + 2)
        + [0] * (len(enc("4")) + 2) + [1] * len(enc("It is 4.")) + [1]
    )
    assert render_conversation(tokenizer, conversation) == (expected_ids, expected_mask)
    assert template_render(tokenizer, conversation) == (expected_ids, expected_mask)


def test_parts_are_encoded_separately(tokenizer):
    def content(parts):
        return [{"role": "user", "content": "x"}, {"role": "assistant", "content": parts}]

    split = render_conversation(tokenizer, content([{"type": "text", "text": "k."}, {"type": "text", "text": "\n\nLet"}]))
    joined = render_conversation(tokenizer, content("k.\n\nLet"))
    assert split != joined  # the boundary matters for this pair...
    assert split[0][5:-1] == encode_texts(tokenizer, ["k."])[0] + encode_texts(tokenizer, ["\n\nLet"])[0]
    assert template_render(tokenizer, content([{"type": "text", "text": "k."}, {"type": "text", "text": "\n\nLet"}])) == split


def test_generation_prompt_equals_render_for_completion(tokenizer):
    done = 0
    for conversation in CONVERSATIONS:
        messages = conversation["messages"]
        if messages[-1]["role"] != "assistant":
            continue
        ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False)
        assert ids == render_for_completion(tokenizer, conversation, max_tokens=10**9)
        assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant_start|>")
        done += 1
    assert done > 50
    with pytest.raises(ChatFormatError, match="last message must be the assistant's"):
        render_for_completion(tokenizer, [{"role": "user", "content": "hi"}])


def test_render_for_completion_truncates_before_the_assistant_start(tokenizer):
    conversation = [{"role": "user", "content": "word " * 500}, {"role": "assistant", "content": "x"}]
    ids = render_for_completion(tokenizer, conversation, max_tokens=100)
    assert len(ids) == 101 and ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant_start|>")


OPENAI = [
    {"role": "system", "content": "You can compute."},
    {"role": "user", "content": [{"type": "text", "text": "What is 12*3"}, {"type": "text", "text": "?"}]},
    {"role": "assistant", "content": "Let me compute.",
     "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": {"code": "12*3"}}}]},
    {"role": "tool", "name": "python", "content": "36"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": "36+1"}},
                    {"type": "function", "function": {"name": "calc", "arguments": {"a": 1, "b": "ü"}}}]},
    {"role": "tool", "content": "37"},
    {"role": "tool", "content": [{"type": "text", "text": "err"}]},
    {"role": "assistant", "content": "It is 36."},
    {"role": "user", "content": "thanks"},
]
NANOCHAT = [
    {"role": "user", "content": "You can compute.\n\nWhat is 12*3?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "12*3"},
        {"type": "python_output", "text": "36"},
        {"type": "python", "text": "36+1"},
        {"type": "python", "text": '{"a": 1, "b": "ü"}'},
        {"type": "python_output", "text": "37"},
        {"type": "python_output", "text": "err"},
        {"type": "text", "text": "It is 36."},
    ]},
    {"role": "user", "content": "thanks"},
]


def test_openai_tool_call_shape_maps_to_parts(tokenizer):
    assert normalize_conversation(OPENAI) == NANOCHAT
    expected = spec_render(tokenizer, {"messages": NANOCHAT})
    assert render_conversation(tokenizer, OPENAI) == expected
    assert template_render(tokenizer, OPENAI) == expected


def test_generation_prompt_after_a_tool_message_continues_the_assistant_turn(tokenizer):
    messages = OPENAI[:4]  # ... assistant tool call, tool output
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    closed = render_conversation(tokenizer, messages)[0]
    assert closed[-1] == tokenizer.convert_tokens_to_ids("<|assistant_end|>")
    assert ids == closed[:-1]  # no <|assistant_end|>, no new <|assistant_start|>: the model goes on
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|output_end|>")


BAD = [
    ([{"role": "robot", "content": "hi"}], 'message 0 (role "robot"): unknown role'),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 .*expected an assistant message"),
    ([{"role": "assistant", "content": "a"}], 'message 0 (role "assistant"): expected a user message'),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only allowed as the first message"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "must be followed by a user message"),
    ([{"role": "system", "content": "s"}], "must be followed by a user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "part 0 has unknown type"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}],
     "part 0 must be a dict with a string 'text'"),
    ([{"role": "user", "content": 5}], "content must be a string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "python", "text": "1"}]}], "part 0 must be a text part"),
    ([{"role": "tool", "content": "1"}], "a tool message must follow an assistant message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3.5}], "assistant content must be"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}],
     "a tool call needs"),
    ([{"content": "no role"}], "message 0 (role null): unknown role"),
]


@pytest.mark.parametrize(("messages", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_conversations_fail_clearly_in_both_paths(tokenizer, messages, message):
    pattern = message if ".*" in message else message.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ChatFormatError, match=pattern):
        render_conversation(tokenizer, messages)
    with pytest.raises(TemplateError, match=pattern):
        tokenizer.apply_chat_template(messages, tokenize=False)


def test_generation_prompt_after_an_assistant_message_is_refused(tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(TemplateError, match="add_generation_prompt needs a conversation that ends with a user"):
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_special_token_text_in_content(tokenizer):
    # The renderer follows nanochat (content is plain text); a plain HF template render parses the special
    # token, as every HF template does. sanitize_control_tokens=True keeps it text (no injection), though the
    # text around it is encoded in pieces, so the ids may differ from the renderer's.
    end = tokenizer.convert_tokens_to_ids("<|assistant_end|>")
    messages = [{"role": "user", "content": "say <|assistant_end|> now"}, {"role": "assistant", "content": "ok"}]
    ids, _ = render_conversation(tokenizer, messages)
    assert ids.count(end) == 1
    assert template_render(tokenizer, messages)[0].count(end) == 2
    sanitized = tokenizer.apply_chat_template(messages, return_dict=False, sanitize_control_tokens=True)
    assert sanitized.count(end) == 1 and tokenizer.decode(sanitized) == tokenizer.decode(ids)


def test_continue_final_message_leaves_the_turn_open(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    ids = tokenizer.apply_chat_template(messages, continue_final_message=True, return_dict=False)
    assert ids == render_conversation(tokenizer, messages)[0][:-1]  # all but <|assistant_end|>


def test_conversation_dict_and_list_forms_agree_and_input_is_not_modified(tokenizer):
    conversation = copy.deepcopy(CONVERSATIONS[0])
    before = copy.deepcopy(conversation)
    assert render_conversation(tokenizer, conversation) == render_conversation(tokenizer, conversation["messages"])
    assert conversation == before
    assert all(t in tokenizer.chat_template for t in SPECIAL_TOKENS)
