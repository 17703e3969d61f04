"""What a served answer shows: stop sequences cut it, a streamed answer sends only text no later token can take
back, and a conversation is laid out as training laid out its examples."""

import copy
import threading

import pytest
import torch

from fl_core.chat import ChatDataset, conversation_ids
from fl_core.data import TextDataset
from fl_core.model import build_model, load_tokenizer
from gateway.generation import TextWatch, visible
from tests.conftest import tiny_config

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize(("text", "stops", "shown", "stopped"), [
    ("Injury, poisoning", ("\n",), "Injury, poisoning", False),
    ("Injury\nNeoplasms", ("\n",), "Injury", True),
    ("Injury END more END", ("END", "more"), "Injury ", True),  # the earliest stop wins, whichever it is
    ("Injury EN", ("END",), "Injury ", False),  # "EN" may become "END": held back
    ("Injury E", ("END", "Ex"), "Injury ", False),
    ("Injury N", ("END",), "Injury N", False),
    ("caf\ufffd", (), "caf", False),  # a character whose bytes are still arriving
])
def test_stop_sequences_cut_the_answer_and_a_possible_start_of_one_is_held_back(
        text: str, stops: tuple[str, ...], shown: str, stopped: bool) -> None:
    assert visible(text, stops) == (shown, stopped)


def test_a_conversation_is_laid_out_as_training_laid_out_its_examples() -> None:
    tok = load_tokenizer(tiny_config().model)  # MiniLM's: no chat template, the plain layout
    trained = ChatDataset(TextDataset(("femur",), (0,), ("Injury (S00-T88)",)), tok, 32, "title")
    assert conversation_ids(tok, [{"role": "user", "content": "femur"}]) == \
        trained.input_ids[0][:trained.prompt_lengths[0]].tolist() == tok("Diagnosis: femur\nChapter:")["input_ids"]
    turns = [{"role": "user", "content": "femur"}, {"role": "assistant", "content": "injury"},
             {"role": "user", "content": "lung"}]
    assert tok.decode(conversation_ids(tok, turns), skip_special_tokens=True) == \
        tok.decode(tok("Diagnosis: femur\nChapter: injury\nDiagnosis: lung\nChapter:")["input_ids"],
                   skip_special_tokens=True)
    templated = copy.deepcopy(tok)
    templated.chat_template = TEMPLATE

    def text(messages: list[dict[str, str]]) -> str:
        return str(templated.decode(conversation_ids(templated, messages), skip_special_tokens=True))

    # training's empty system turn unless the client brings one, which then replaces it
    assert text([{"role": "user", "content": "femur"}]).replace(" ", "") == \
        "<system></system><user>femur</user><assistant>"
    assert text([{"role": "system", "content": "code it"}, {"role": "user", "content": "femur"}]).replace(" ", "") \
        == "<system>codeit</system><user>femur</user><assistant>"


def test_generation_stops_at_a_stop_sequence_and_when_the_client_leaves() -> None:
    cfg = tiny_config("task=causal-lm")
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg, tok, 0, torch.device("cpu"))
    prompt = torch.tensor([tok("Patient presents with")["input_ids"]])

    def run(watch: TextWatch) -> int:
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                             do_sample=False, stopping_criteria=[watch], pad_token_id=tok.pad_token_id)
        return int(out.shape[1] - prompt.shape[1])

    pieces: list[str] = []
    free = TextWatch(tok, prompt.shape[1], (), pieces.append)
    assert run(free) == 40 and "".join(pieces) == free.shown != ""
    stop = free.shown.split()[3]
    stopped = TextWatch(tok, prompt.shape[1], (stop,))
    assert run(stopped) < 40 and stopped.stopped and free.shown.startswith(stopped.shown)
    assert stop not in stopped.shown
    gone = threading.Event()
    leaving = TextWatch(tok, prompt.shape[1], (), lambda _: gone.set(), gone)  # the client leaves on the first text
    assert run(leaving) <= 2
