"""GGUF vocabularies against llama.cpp's tokenizer test vectors (shared/reference/vocab)."""
from pathlib import Path

import pytest

from models.gguf_file import open_gguf
from models.tokenizer import load_tokenizer

VOCAB = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "vocab"


def _vectors(name: str) -> list[tuple[str, list[int]]]:
    """Each string of the .inp file ends with a separator line; the .out file has one line of ids per string."""
    texts = (VOCAB / f"{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    ids = (VOCAB / f"{name}.gguf.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(texts) == len(ids)
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


@pytest.fixture(scope="module")
def command_r():
    return load_tokenizer(VOCAB / "ggml-vocab-command-r.gguf")


@pytest.fixture(scope="module")
def llama_spm():
    return load_tokenizer(VOCAB / "ggml-vocab-llama-spm.gguf")


def test_command_r_metadata(command_r):
    assert command_r.bos_token_id == 5 and 255001 in command_r.eos_token_ids and command_r.vocab_size == 256000


def test_llama_spm_metadata_and_bos(llama_spm):
    assert llama_spm.bos_token_id == 1 and llama_spm.eos_token_ids == (2,) and llama_spm.vocab_size == 32000
    assert llama_spm.encode("Hello world") == [1] + llama_spm.encode("Hello world", add_special_tokens=False)
    assert llama_spm.encode("<s>[INST] hi", add_special_tokens=False)[0] == 1  # the chat template's BOS


@pytest.mark.parametrize("text,expected", _vectors("ggml-vocab-command-r"), ids=lambda v: repr(v)[:30])
def test_command_r_vectors(command_r, text, expected):
    assert command_r.encode(text, add_special_tokens=False) == expected
    assert command_r.decode(expected, skip_special_tokens=False) == text


@pytest.mark.parametrize("text,expected", _vectors("ggml-vocab-llama-spm"), ids=lambda v: repr(v)[:30])
def test_llama_spm_vectors(llama_spm, text, expected):
    assert llama_spm.encode(text, add_special_tokens=False) == expected
    assert llama_spm.decode(expected, skip_special_tokens=False) == text


def _sentencepiece_model(path: Path) -> Path:
    """Llama's vocabulary as a Llama-2 `tokenizer.model` (SentencePiece BPE, byte fallback, prefix space)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = open_gguf(VOCAB / "ggml-vocab-llama-spm.gguf")
    field = lambda name: reader.fields[f"tokenizer.ggml.{name}"].contents()  # noqa: E731
    proto = pb.ModelProto()
    for piece, score, kind in zip(field("tokens"), field("scores"), field("token_type")):
        proto.pieces.add(piece=piece, score=score, type=kind)
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    path.write_bytes(proto.SerializeToString())
    return path


def test_llama_2_folder_with_tokenizer_model(tmp_path, llama_spm):
    """A folder with only `tokenizer.model` tokenizes like the sentencepiece library itself (LlamaTokenizer's
    behaviour) and like the GGUF vocabulary, and adds BOS as tokenizer_config.json says."""
    import json

    import sentencepiece
    model = _sentencepiece_model(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "add_bos_token": True}))
    folder, reference = load_tokenizer(tmp_path), sentencepiece.SentencePieceProcessor(model_file=str(model))
    for text, expected in _vectors("ggml-vocab-llama-spm"):
        assert folder.encode(text, add_special_tokens=False) == expected == reference.encode(text)
        assert folder.decode(expected) == text
    assert folder.encode("Hi") == [1] + reference.encode("Hi") and folder.eos_token_ids == (2,)
    (tmp_path / "tokenizer_config.json").write_text("{}")  # LlamaTokenizer's defaults: BOS <s>, added; EOS </s>
    defaults = load_tokenizer(tmp_path)
    assert defaults.encode("Hi") == [1] + reference.encode("Hi") and defaults.eos_token_ids == (2,)
