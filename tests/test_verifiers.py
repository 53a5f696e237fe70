"""Verifiers on tiny random models built offline, the shapes checker, and the learned verifier."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from sana_jax.data import shapes
from sana_jax.scaling import learned_verifier, search, verifiers
from sana_jax.text_encoder import WordTextEncoder

PROMPTS = ["a red circle", "two green triangles left of a blue square", "a cat", "a dog on a mat", "yes"]
# The judge question as SANA's inference-scaling script writes it.
QUESTION = ("You are an AI assistant specializing in image analysis and ranking. Your task is to analyze "
            "and compare image based on how well they match the given prompt.\nThe given prompt is:{}. "
            "Please consider the prompt and the image to make a decision and response directly with 'yes' "
            "or 'no'.\n")
CHAT_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
                 "{% endfor %}{% endfor %}{% if add_generation_prompt %}ANSWER:{% endif %}")


def _tokenizer(template: str, special: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <pad>=0, <eos>=1, <bos>=2, <unk>=3 and `special` after them."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300,
                                  special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", *special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([QUESTION, *PROMPTS, "USER: ANSWER: yes no"], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", 2), ("<eos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(count, 20, 24, 3))


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(image * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def vlm_checkpoint(tmp_path_factory):
    """A tiny random LLaVA (CLIP vision tower, Llama text model) with its processor and chat template."""
    folder = tmp_path_factory.mktemp("llava")
    tokenizer = _tokenizer("<bos> $A", ["<image>"], 512)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                pad_token_id=0, bos_token_id=2, eos_token_id=1),
        image_token_index=4, vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def judge(vlm_checkpoint):
    return verifiers.VLMJudge(vlm_checkpoint, batch_size=3)


def _direct_yes_no(checkpoint: str, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Unpadded forwards of the judge's model, one image at a time: (N, 2) next-token yes and no logits."""
    processor = LlavaProcessor.from_pretrained(checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    yes = processor.tokenizer.encode("yes", add_special_tokens=False)[0]
    no = processor.tokenizer.encode("no", add_special_tokens=False)[0]
    out = []
    for image, prompt in zip(images, prompts, strict=True):
        text = f"USER: <image>\n{QUESTION.format(prompt)}ANSWER:"
        inputs = processor(text=[text], images=[_pil(image)], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        out.append((float(logits[yes]), float(logits[no])))
    return np.array(out)


def test_judge_question_is_sanas():
    assert verifiers.SANA_JUDGE_QUESTION == QUESTION.replace("{}", "{prompt}")


def test_judge_reads_first_answer_token(judge, vlm_checkpoint):
    images = _images(5)
    assert judge.prompt_text("a cat") == f"USER: <image>\n{QUESTION.format('a cat')}ANSWER:"
    # Five prompts of different lengths in batches of three and two: right padding inside each batch.
    yes, no = judge.yes_no_logits(images, PROMPTS)
    expected = _direct_yes_no(vlm_checkpoint, images, PROMPTS)
    np.testing.assert_allclose(yes, expected[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(no, expected[:, 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(judge.score(images, PROMPTS), expected[:, 0] - expected[:, 1], rtol=1e-5,
                               atol=1e-5)


# compare(a, b) -> 0 when a wins, worked by hand from docs/inference_scaling.md's rule: an image answers yes when its
# yes-logit exceeds its no-logit; a yes beats a no; two yeses: the higher yes-logit wins; two noes: the lower
# no-logit wins; an exact tie goes to b (SANA's comparisons are strict). ((yes_a, no_a), (yes_b, no_b), result)
COMPARE_CASES = [
    ((3.0, -1.0), (0.0, 2.0), 0),  # yes beats no
    ((-2.0, 0.0), (0.1, 0.0), 1),
    ((0.0, 0.5), (7.0, 8.0), 0),  # two noes: 0.5 < 8, although b's yes-logit is far larger
    ((6.0, 5.0), (2.0, -4.0), 0),  # two yeses: 6 > 2, although b's margin is larger
    ((2.0, -4.0), (6.0, 5.0), 1),
    ((1.0, 1.0), (-3.0, 0.0), 1),  # equal logits answer no; two noes: 0 < 1
    ((1.0, 1.0), (0.0, -0.5), 1),  # b answers yes
    ((2.0, 0.0), (2.0, 1.0), 1),  # tie
]


def _fixed_logits(a, b, yes, no):
    """A stand-in for `yes_no_logits` that expects the pair [a, b] and answers the given (2,) logits."""
    def logits(images, prompts):
        assert prompts == ["a red circle"] * 2
        np.testing.assert_array_equal(images, [a, b])
        return np.array(yes), np.array(no)

    return logits


def test_judge_compare_follows_the_table(judge, monkeypatch):
    """compare reads the judge's logits of [a, b] in that order and applies the rule."""
    a, b = _images(2, seed=1)
    for (yes_a, no_a), (yes_b, no_b), result in COMPARE_CASES:
        monkeypatch.setattr(judge, "yes_no_logits", _fixed_logits(a, b, [yes_a, yes_b], [no_a, no_b]))
        assert judge.compare(a, b, "a red circle") == result, (yes_a, no_a, yes_b, no_b)


def test_bad_inputs_are_rejected(judge, vlm_checkpoint):
    with pytest.raises(ValueError, match="expected floats in"):
        judge.score(_images(2) * 2, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"expected \(N, H, W, 3\)"):
        judge.score(_images(2)[..., :1], PROMPTS[:2])
    with pytest.raises(ValueError, match="expected a list of 2 prompts"):
        judge.score(_images(2), PROMPTS[:3])
    with pytest.raises(ValueError, match="same token"):
        verifiers.VLMJudge(vlm_checkpoint, yes="yes", no="yes")


def test_clip_scorer_matches_direct_computation(tmp_path):
    tokenizer = _tokenizer("<bos> $A <eos>", [], 16)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(tmp_path)
    config = CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path)

    images = _images(5)
    scores = verifiers.ClipScorer(str(tmp_path), batch_size=2).score(images, PROMPTS)

    pixels = image_processor([_pil(image) for image in images], return_tensors="pt")["pixel_values"]
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, return_tensors="pt")
    assert tokens["attention_mask"][1].all()  # The long prompt is cut to 16 tokens.
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_embeds = model.text_projection(model.text_model(**tokens).pooler_output)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    expected = model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1)
    np.testing.assert_allclose(scores, expected.detach().numpy(), rtol=1e-5, atol=1e-5)


def _shapes_batch(count: int, tasks=shapes.TASKS) -> list[shapes.Sample]:
    return [shapes.make_sample(7, i, tasks=tasks) for i in range(count)]


def test_checker_verifier_agrees_with_rendered_ground_truth():
    samples = _shapes_batch(12)
    images = np.stack([s.image for s in samples]) / 255.0
    prompts = [s.prompt for s in samples]
    others = prompts[1:] + prompts[:1]
    verifier = verifiers.CheckerVerifier()
    np.testing.assert_array_equal(verifier.score(images, prompts), np.ones(12))
    # A prompt of another sample holds exactly when the renderer's objects satisfy it.
    expected = [float(shapes.satisfies(shapes.parse_prompt(p), s.objects)[0])
                for p, s in zip(others, samples, strict=True)]
    assert 0 < sum(expected) < 12  # Both outcomes occur.
    np.testing.assert_array_equal(verifier.score(images, others), expected)


def test_add_mismatched_pairs():
    images = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 2, 2, 3), np.float32)
    prompts = ["a", "b", "a", "c"]
    out_images, out_prompts, labels = learned_verifier.add_mismatched_pairs(
        images, prompts, np.random.default_rng(0))
    assert out_prompts[:4] == prompts and sorted(out_prompts[4:]) == sorted(prompts)
    np.testing.assert_array_equal(out_images, np.concatenate([images, images]))
    own = prompts + prompts
    np.testing.assert_array_equal(labels, [float(p == q) for p, q in zip(out_prompts, own, strict=True)])


@pytest.mark.slow
def test_learned_verifier_overfits_and_round_trips(tmp_path):
    samples = _shapes_batch(8, tasks=("colors", "position"))
    images = np.stack([s.image for s in samples]) / 255.0
    prompts = [s.prompt for s in samples]
    batch = learned_verifier.add_mismatched_pairs(images, prompts, np.random.default_rng(0))
    labels = batch[2]
    assert 0 < labels.sum() < len(labels)
    encoder = WordTextEncoder()
    config = learned_verifier.VerifierConfig(text_length=encoder.max_length, widths=(8, 16), text_width=16)
    config, params, losses = learned_verifier.train_learned_verifier(
        itertools.repeat(batch), encoder, steps=60, config=config, learning_rate=3e-3)
    assert losses.shape == (60,)
    assert losses[-1] < 0.05 < losses[0]

    path = str(tmp_path / "verifier.msgpack")
    learned_verifier.save(path, config, params)
    loaded_config, loaded_params = learned_verifier.load(path)
    assert loaded_config == config
    loaded = learned_verifier.LearnedVerifier(loaded_config, loaded_params, encoder, batch_size=16)
    scores = loaded.score(batch[0], batch[1])
    np.testing.assert_array_equal(scores > 0, labels > 0.5)
    trained = learned_verifier.LearnedVerifier(config, params, encoder, batch_size=16)
    np.testing.assert_allclose(scores, trained.score(batch[0], batch[1]), rtol=1e-6)

    # As a yes/no judge: P(yes) is the sigmoid of the score, and SANA's knockout over the candidates of a prompt
    # keeps the best-scored one (a tournament under a judge that prefers the higher score keeps the maximum).
    yes, no = loaded.yes_no_logits(batch[0], batch[1])
    np.testing.assert_allclose(np.exp(yes) / (np.exp(yes) + np.exp(no)), 1 / (1 + np.exp(-scores)), rtol=1e-5)
    table = scores.reshape(2, 8)  # two "prompts" of 8 candidates: the originals, then the shuffled pairs
    assert all(len(np.unique(row)) == 8 for row in table)  # no ties: each row's maximum is unique
    winners = search.knockout(yes.reshape(2, 8), no.reshape(2, 8), k=1)[:, 0]
    np.testing.assert_array_equal(winners, np.argmax(table, axis=1))
