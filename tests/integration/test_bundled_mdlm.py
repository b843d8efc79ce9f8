"""The bundled ``models/tiny-shakespeare-mdlm`` through the real server: detected as diffusion text, its
samples are mostly words of the training plays, the text crystallises over a stream, and its prompt ELBO is
a finite bound near its card's held-out figure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from models.recipes.shakespeare_texts import words_of
from tests.integration.server import REPO_ROOT, RunningServer, running_server, stream_events

MODEL_DIR = REPO_ROOT / "models" / "tiny-shakespeare-mdlm"
DICTIONARY_FILE = REPO_ROOT / "models" / "tiny-shakespeare" / "words.txt"

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(), reason="not bundled")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server({"tiny-shakespeare-mdlm": MODEL_DIR}, tmp_path_factory.mktemp("logs")) as running:
        yield running


def test_samples_are_mostly_words_of_the_plays(server: RunningServer) -> None:
    dictionary = set(DICTIONARY_FILE.read_text(encoding="utf-8").split())
    with server.client() as http:
        model = http.get("/models").json()["models"][0]
        assert (model["paradigm"], model["modality"]) == ("diffusion", "text")
        texts = [http.post("/generate", json={"model": "tiny-shakespeare-mdlm", "prompt": prompt, "max_tokens": 64,
                                              "steps": 16, "seed": seed}).json()["text"]
                 for seed, prompt in enumerate(["ROMEO:", "KING LEAR:", "JULIET:", "HAMLET:"])]
    words = [word for text in texts for word in words_of(text)]
    assert len(words) > 40 and "\u2591" not in "".join(texts) and "\ufffd" not in "".join(texts)
    assert sum(word in dictionary for word in words) / len(words) >= 0.8


def test_a_stream_crystallises_and_the_elbo_is_a_finite_bound(server: RunningServer) -> None:
    with server.client() as http:
        events = stream_events(http, {"model": "tiny-shakespeare-mdlm", "prompt": "ROMEO:", "max_tokens": 32,
                                      "steps": 8, "seed": 3})
        masks = [event.data["text"].count("\u2591") for event in events if event.event == "progress"]
        assert len(masks) == 8 and masks == sorted(masks, reverse=True) and masks[0] > 0 and masks[-1] == 0
        line = "But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
        bound = http.post("/generate", json={"model": "tiny-shakespeare-mdlm", "prompt": line, "max_tokens": 0,
                                             "prompt_elbo": True, "elbo_samples": 32, "seed": 1}).json()["prompt_elbo"]
    assert 1.0 < bound["bits_per_character"] < 4.0 and bound["characters"] == len(line)
