"""Gemma-2 text features against diffusers' SanaPipeline and a direct transformers forward.

A tiny random Gemma-2 and a byte-level BPE tokenizer are built here and saved to a folder, which the
encoder loads through the same path as a real checkpoint.
"""

import inspect

import jax
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, SanaPipeline
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModel, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

from sana_jax import text_encoder

# The instruction list exactly as diffusers' SanaPipeline uses it by default.
DIFFUSERS_INSTRUCTION = list(
    inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)
PROMPTS = ["A Red circle ", "two green triangles left of a blue square", "  a cat sleeping"]
# A short instruction and length for the tests that need only the selection arithmetic.
SHORT = dict(max_length=40, instruction=["Describe:", "Prompt: "])


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Gemma's special tokens, trained offline on `corpus`."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def save_tiny_gemma(folder) -> str:
    """Writes a tiny random Gemma2ForCausalLM (as SANA's gemma-2-2b-it is stored) and its tokenizer to `folder`."""
    tokenizer = build_tokenizer(["\n".join(DIFFUSERS_INSTRUCTION), *PROMPTS, "Describe:\nPrompt: "])
    tokenizer.save_pretrained(folder)
    # Grouped-query attention, alternating sliding-window layers with a window far shorter than the
    # prompts, and a soft-cap low enough to bite.
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          query_pre_attn_scalar=8, sliding_window=16, attn_logit_softcapping=1.0,
                          initializer_range=0.2, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
                          bos_token_id=2)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # Gemma norms start at zero; random ones test the (1 + w) scale.
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_gemma(tmp_path_factory.mktemp("gemma2"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The Gemma2Model that diffusers would hold as its text encoder, and the tokenizer."""
    model = AutoModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return text_encoder.GemmaTextEncoder(checkpoint, batch_size=2)


def test_instruction_matches_diffusers():
    assert list(text_encoder.COMPLEX_HUMAN_INSTRUCTION) == DIFFUSERS_INSTRUCTION


def test_features_match_sana_pipeline(encoder, reference):
    model, tokenizer = reference
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None,
                        scheduler=DPMSolverMultistepScheduler())
    with torch.no_grad():
        features, mask, null_features, null_mask = pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=True, negative_prompt="", device=torch.device("cpu"),
            complex_human_instruction=DIFFUSERS_INSTRUCTION)

    ours, our_mask = encoder.encode_text([*PROMPTS, ""])
    assert ours.shape == (4, 300, 32) and ours.dtype == np.float32
    assert our_mask.shape == (4, 300)
    assert (encoder.max_length, encoder.feature_dim) == (300, 32)
    np.testing.assert_allclose(ours[:3], features.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(our_mask[:3], mask.numpy())
    np.testing.assert_allclose(ours[3], null_features[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(our_mask[3], null_mask[0].numpy())


def test_prefix_and_selection_rederived(checkpoint, reference):
    model, tokenizer = reference
    encoder = text_encoder.GemmaTextEncoder(checkpoint, **SHORT)
    features, mask = encoder.encode_text(["Two Green triangles ", ""])

    prefix = "Describe:\nPrompt: "
    prefix_tokens = len(tokenizer(prefix)["input_ids"])  # BOS included.
    total = prefix_tokens + 40 - 2
    inputs = tokenizer([prefix + "two green triangles"], padding="max_length", max_length=total,
                       return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state[0].numpy()
    keep = [0] + list(range(total - 39, total))
    np.testing.assert_allclose(features[0], hidden[keep], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mask[0], inputs["attention_mask"][0].numpy()[keep])
    # The prompt's tokens plus the prefix tokens that reach into the kept window.
    real = int(inputs["attention_mask"].sum())
    assert mask[0].sum() == 1 + real - (total - 39)

    null = tokenizer([""], padding="max_length", max_length=40, return_tensors="pt")
    with torch.no_grad():
        null_hidden = model(**null).last_hidden_state[0].numpy()
    np.testing.assert_allclose(features[1], null_hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mask[1], [1] + [0] * 39)


def test_without_instruction_matches_transformers(checkpoint, reference, encoder):
    """`instruction=False` encodes prompts as diffusers encodes negative prompts: no prefix, `max_length`
    tokens, all kept; cached apart from the same prompts with the instruction."""
    model, tokenizer = reference
    prompts = ["Blurry, Low quality ", "a cat sleeping", ""]
    ours, mask = encoder.encode_text(prompts, instruction=False)
    inputs = tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=300,
                       return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mask, inputs["attention_mask"].numpy())

    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None,
                        scheduler=DPMSolverMultistepScheduler())
    with torch.no_grad():
        *_, negative, negative_mask = pipe.encode_prompt(
            prompts[:1], do_classifier_free_guidance=True, negative_prompt=prompts[0],
            device=torch.device("cpu"), complex_human_instruction=DIFFUSERS_INSTRUCTION)
    np.testing.assert_allclose(ours[0], negative[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mask[0], negative_mask[0].numpy())

    prefixed, prefixed_mask = encoder.encode_text(prompts)
    assert np.abs(prefixed[:2] - ours[:2]).max() > 1e-2
    np.testing.assert_array_equal(prefixed[2], ours[2])  # The null caption is never prefixed.
    np.testing.assert_array_equal(encoder.encode_text(prompts, instruction=False)[0], ours)


def test_tokenizer_path(checkpoint, tmp_path):
    """Tokenizer and model in separate folders, as in a diffusers pipeline (tokenizer/, text_encoder/)."""
    model_dir, tokenizer_dir = tmp_path / "text_encoder", tmp_path / "tokenizer"
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(tokenizer_dir)
    Gemma2ForCausalLM.from_pretrained(checkpoint).save_pretrained(model_dir)
    assert not list(model_dir.glob("tokenizer*"))
    expected, expected_mask = text_encoder.GemmaTextEncoder(checkpoint, **SHORT).encode_text(PROMPTS)
    for backend in text_encoder.BACKENDS:
        split = text_encoder.GemmaTextEncoder(str(model_dir), tokenizer_path=str(tokenizer_dir), backend=backend,
                                              **SHORT)
        features, mask = split.encode_text(PROMPTS)
        np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(mask, expected_mask)


def test_cache_and_batching(checkpoint):
    encoder = text_encoder.GemmaTextEncoder(checkpoint, batch_size=2, cache_size=2, max_length=24)
    calls = []
    forward = encoder._forward
    encoder._forward = lambda ids, mask: calls.append(len(ids)) or forward(ids, mask)

    a, _ = encoder.encode_text(["a cat sleeping"])
    b, _ = encoder.encode_text(["two green triangles"])
    assert calls == [1, 1]
    both, _ = encoder.encode_text(["A cat sleeping", "two green triangles", "a cat sleeping "])
    assert calls == [1, 1]  # Cached by the preprocessed prompt.
    np.testing.assert_array_equal(both, np.stack([a[0], b[0], a[0]]))

    encoder.encode_text(["a cat sleeping"])  # Now the most recently used.
    encoder.encode_text(["a red circle"])  # Evicts the least recently used, "two green triangles".
    encoder.encode_text(["a cat sleeping"])
    assert calls == [1, 1, 1]
    encoder.encode_text(["two green triangles"])
    assert calls == [1, 1, 1, 1]

    # Three new prompts run as batches of two and one, with the same features as one at a time.
    fresh, _ = encoder.encode_text(["x", "y", "z"])
    assert calls[4:] == [2, 1]
    np.testing.assert_allclose(fresh[0], encoder.encode_text(["x"])[0][0], rtol=1e-6, atol=1e-6)


def test_jax_gemma2_matches_transformers(checkpoint, reference):
    model, _ = reference
    spec = text_encoder.Gemma2Spec.from_hf(model.config)
    assert spec.sliding_layers == (True, False, True)
    params = text_encoder.gemma2_params(
        {k: v.numpy() for k, v in Gemma2ForCausalLM.from_pretrained(checkpoint).state_dict().items()}, spec)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, model.config.vocab_size, size=(3, 40))
    mask = np.ones_like(ids)
    mask[1, 25:] = 0  # Padding reaching beyond the sliding window, as in real prompts.
    mask[2, 3:] = 0
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ours = jax.jit(text_encoder.gemma2_forward, static_argnums=1)(params, spec, ids, mask)
    np.testing.assert_allclose(np.asarray(ours), expected.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)


def test_jax_backend_matches_torch_backend(checkpoint):
    prompts = [*PROMPTS, ""]
    jax_encoder = text_encoder.GemmaTextEncoder(checkpoint, backend="jax", batch_size=3, **SHORT)
    torch_encoder = text_encoder.GemmaTextEncoder(checkpoint, backend="torch", batch_size=3, **SHORT)
    ours, mask = jax_encoder.encode_text(prompts)
    expected, expected_mask = torch_encoder.encode_text(prompts)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(mask, expected_mask)


def test_gemma2_params_names_missing_weights(reference):
    model, _ = reference
    spec = text_encoder.Gemma2Spec.from_hf(model.config)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing \['layers.1.mlp.up_proj.weight'\]"):
        text_encoder.gemma2_params(state, spec)


def test_bad_arguments(checkpoint, encoder):
    with pytest.raises(ValueError, match="backend='flax'"):
        text_encoder.GemmaTextEncoder(checkpoint, backend="flax")
    with pytest.raises(TypeError, match="a list of strings"):
        encoder.encode_text("a red circle")
