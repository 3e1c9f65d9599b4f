"""Tiny, randomly initialised, offline checkpoints of the four caption families, for tests.

Public API:

* ``FAMILIES`` - the service's family ids.
* ``tiny_checkpoint(family, variant="default") -> Path`` - a folder that loads with
  ``AutoProcessor.from_pretrained`` / ``AutoModelForImageTextToText.from_pretrained`` offline. Built once and
  cached on disk (``$TINY_MODELS_DIR`` or ``<repo>/.cache/tiny-models``) under a key that hashes this file's source,
  the transformers and torch versions and the variant, so editing this builder rebuilds.
* ``sample_images()`` / ``image_bytes(img, fmt)`` - three deterministic, visually different test images.
* ``reference_captions(folder, family, images, ...)`` - the oracle: a direct, batched, greedy transformers call.
* ``DEFAULT_CHAT_INSTRUCTION`` - the instruction the chat families use when no prompt is given.

The models are tiny (about 50-80k parameters, 32x32 images) but structurally mirror the real checkpoints
(Salesforce/blip-image-captioning-base, Salesforce/blip2-opt-2.7b, google/gemma-3-*-it, OpenGVLab/InternVL3-*-hf):
same processor / tokenizer / image-processor classes, special tokens, padding side, chat templates and
generation configs. A few initialisation settings are changed on purpose so that the random models' greedy captions
depend on the image (with the library defaults every image gets the same caption):

* BLIP / BLIP-2: ``initializer_range=0.1`` instead of 0.02.
* Gemma 3: the multimodal projection matrix (zero-initialised by transformers) is re-initialised with N(0, 0.1),
  and ``sliding_window=512`` (a window shorter than the prompt made prompted outputs image-independent).
* InternVL: ``initializer_range=0.2`` for the vision tower and the language model.
* BLIP-2, Gemma 3, InternVL (byte-level / byte-fallback vocabularies): the output-embedding rows of tokens that do
  not decode to printable text on their own (lone UTF-8 bytes, control characters) are zeroed, so the random models
  emit printable text instead of strings of U+FFFD / control characters, which often collapsed different outputs
  into identical strings. Tokenizers, configs and generation configs are untouched.

This module must stay independent of the service code (``captioners/`` etc.): it is the reference the service is
compared against.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

__all__ = [
    "DEFAULT_CHAT_INSTRUCTION",
    "FAMILIES",
    "VARIANTS",
    "image_bytes",
    "reference_captions",
    "sample_images",
    "tiny_checkpoint",
]

FAMILIES = ("blip", "blip2", "gemma", "intern_vlm")

# variant -> families it exists for
VARIANTS = {
    "default": FAMILIES,
    # Processor num_query_tokens (3) disagrees with the model config (4). transformers raises no error for this and
    # silently produces image-independent output, so the service has to detect it at start-up.
    "query_token_mismatch": ("blip2",),
}

DEFAULT_CHAT_INSTRUCTION = "Write one concise caption for this image. Reply with the caption only."

_REPO_ROOT = Path(__file__).resolve().parents[2]
_SEED = 0

# Caption-like corpus the tokenizers are trained on (BLIP's WordPiece vocab is built from its words).
_CORPUS = [
    "a photo of a woman sitting on the beach with her dog",
    "a man riding a bike down a city street",
    "two cats sleeping on a couch next to a remote",
    "a plate of food with broccoli and rice on a table",
    "a group of people standing in front of a building",
    "a red car parked on the side of the road",
    "a dog running through the grass in a park",
    "a little girl holding an umbrella in the rain",
    "a kitchen with a stove a sink and a refrigerator",
    "an airplane flying in the blue sky over the mountains",
    "a bowl of fruit with apples and bananas",
    "a cat sitting on a laptop keyboard",
    "a train traveling down the tracks near a station",
    "a boat floating on the water at sunset",
    "a person skiing down a snowy hill",
    "a close up of a pizza on a wooden table",
    "Question: Describe the image. Answer: a picture of a street",
    "Describe this image in one sentence.",
    "What is in the picture? There is a small house and a tree.",
    "user model assistant system image picture photo caption describe",
    "The image shows a beautiful view of the city at night.",
    "This is an image of a black and white bird standing on a rock.",
    "Write one concise caption for this image. Reply with the caption only.",
    "You are a helpful assistant that writes short, accurate captions.",
]

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]

# Chat template of google/gemma-3-*-it (an image item becomes <start_of_image>, which the processor expands).
_GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Chat template of OpenGVLab/InternVL3-*-hf (an image item becomes '<IMG_CONTEXT>\n', which the processor expands to
# '<img>' + '<IMG_CONTEXT>' * image_seq_length * num_tiles + '</img>').
_INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------------------------
# images


def sample_images() -> list[Image.Image]:
    """Three deterministic, visually different RGB images of different sizes (640x480, 320x512, 200x200)."""
    w, h = 640, 480
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    grad = np.broadcast_to(x, (h, w, 1))
    gradient = np.concatenate([grad, np.zeros((h, w, 1), np.float32), 255 - grad], axis=2).astype(np.uint8)
    w, h = 320, 512
    yy, xx = np.mgrid[0:h, 0:w]
    check = (((yy // 32) + (xx // 32)) % 2 * 255).astype(np.uint8)
    checkerboard = np.stack([check, check, np.full_like(check, 40)], axis=2)
    noise = np.random.default_rng(0).integers(0, 255, size=(200, 200, 3), dtype=np.uint8)
    return [Image.fromarray(a, "RGB") for a in (gradient, checkerboard, noise)]


def image_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    """Encode a PIL image (e.g. for an upload request body)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# cache


def _check(family: str, variant: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {tuple(VARIANTS)}")
    if family not in VARIANTS[variant]:
        raise ValueError(f"variant {variant!r} exists only for {VARIANTS[variant]}, not {family!r}")


def _cache_root() -> Path:
    env = os.environ.get("TINY_MODELS_DIR")
    return Path(env) if env else _REPO_ROOT / ".cache" / "tiny-models"


def _cache_key(variant: str) -> str:
    """Short hash of this module's source, the transformers (and torch, whose RNG draws the weights) version and the
    variant: editing the builder or upgrading the libraries gives a new folder."""
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(b"\0" + transformers.__version__.encode())
    h.update(b"\0" + torch.__version__.encode())
    h.update(b"\0" + variant.encode())
    return h.hexdigest()[:12]


def tiny_checkpoint(family: str, variant: str = "default") -> Path:
    """Path of a cached tiny checkpoint folder for ``family`` (built on first use, under a file lock)."""
    _check(family, variant)
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    name = f"{family}-{variant}-{_cache_key(variant)}"
    final = root / name
    if final.is_dir():
        return final
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if final.is_dir():  # another process built it while we waited
                return final
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
            tmp.chmod(0o755)
            try:
                _build_checkpoint(family, variant, tmp)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                if final.is_dir():  # lost a race with a builder that did not take the lock
                    return final
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


# --------------------------------------------------------------------------------------------------------------------
# builders


def _build_checkpoint(family: str, variant: str, out_dir: str | os.PathLike) -> Path:
    """Build the tiny checkpoint into ``out_dir`` (deterministic; does not disturb the caller's torch RNG)."""
    import torch

    _check(family, variant)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builder = {"blip": _build_blip, "blip2": _build_blip2, "gemma": _build_gemma, "intern_vlm": _build_internvl}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model, processor = builder[family](variant)
        model.eval()
        model.save_pretrained(out)
        processor.save_pretrained(out)
    # The service looks for this file and says, in its log and on the demo page, that the captions are noise.
    (out / "RANDOM_WEIGHTS").write_text(f"A tiny {family} checkpoint with random weights, built offline by "
                                        "tests/support/tiny_models.py: its captions are noise.\n")
    return out


def _train_bpe(backend, vocab_size, special_tokens, initial_alphabet=None):
    """Train ``backend`` (a ``tokenizers.Tokenizer`` with the target class's normalizer / pre-tokenizer) as BPE on
    the corpus; return (vocab, merges) to pass to the transformers tokenizer class."""
    from tokenizers.trainers import BpeTrainer

    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                         initial_alphabet=initial_alphabet or [], show_progress=False)
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    data = json.loads(backend.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    return data["model"]["vocab"], merges


def _zero_unprintable_output_rows(model, tokenizer):
    """Zero the output-embedding rows (tied with the input embeddings in all three families) of non-special tokens
    that do not decode to printable text on their own, so greedy decoding of a random model prefers printable
    tokens. Their logits become exactly 0 while the ~300 other tokens have random logits of either sign."""
    import unicodedata

    import torch

    specials = set(tokenizer.all_special_ids)
    unprintable = []
    for token_id in range(len(tokenizer)):
        if token_id in specials:
            continue
        text = tokenizer.decode([token_id])
        if not text or any(c == "\ufffd" or unicodedata.category(c).startswith("C") or (c.isspace() and c != " ")
                           for c in text):
            unprintable.append(token_id)
    with torch.no_grad():
        model.get_output_embeddings().weight[unprintable] = 0.0


def _build_blip(variant):
    """Like Salesforce/blip-image-captioning-base: BertTokenizer with [DEC] bos, CLIP-normalised images."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for line in _CORPUS for w in re.findall(r"\w+|[^\w\s]", line.lower())})
    chars = sorted({c for w in words for c in w})
    vocab_list = special + words + [c for c in chars if c not in words] + ["##" + c for c in chars]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", extra_special_tokens=["[ENC]"],
                              model_max_length=512)
    image_processor = BlipImageProcessor(
        do_resize=True, size={"height": 32, "width": 32}, resample=3, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=_CLIP_MEAN, image_std=_CLIP_STD, do_convert_rgb=True,
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
            projection_dim=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id, initializer_range=0.1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, initializer_range=0.1,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
        initializer_range=0.1,  # 0.02 (the default) gives the same caption for every image
    )
    return BlipForConditionalGeneration(config), processor


_BLIP2_NUM_QUERY_TOKENS = 4  # real checkpoint: 32


def _build_blip2(variant):
    """Like Salesforce/blip2-opt-2.7b: OPT byte-level BPE (</s> is bos and eos, prepended), left padding,
    '<image>' placeholder repeated num_query_tokens times by the processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
    )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    vocab, merges = _train_bpe(backend, 400, ["<s>", "<pad>", "</s>", "<unk>"], pre_tokenizers.ByteLevel.alphabet())
    tokenizer = GPT2Tokenizer(
        vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        add_bos_token=True, padding_side="left", model_max_length=512,
    )
    image_processor = BlipImageProcessor(
        do_resize=True, size={"height": 32, "width": 32}, resample=3, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=_CLIP_MEAN, image_std=_CLIP_STD, do_convert_rgb=True,
    )
    processor_nq = 3 if variant == "query_token_mismatch" else _BLIP2_NUM_QUERY_TOKENS
    # Blip2Processor adds '<image>' to the tokenizer: build it before reading the id.
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=processor_nq)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=0.1),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=64, max_position_embeddings=64, initializer_range=0.1),
        text_config=dict(
            model_type="opt", vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, init_std=0.1,
        ),
        num_query_tokens=_BLIP2_NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_text_hidden_size=32,
        initializer_range=0.1,
    )
    model = Blip2ForConditionalGeneration(config)
    _zero_unprintable_output_rows(model, tokenizer)
    return model, processor


def _build_gemma(variant):
    """Like google/gemma-3-4b-it: GemmaTokenizer (BPE, byte fallback, '▁' spaces), turn / image special tokens,
    SigLIP tower + pooled projector, generation_config that samples by default."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        GemmaTokenizer,
        GenerationConfig,
    )

    image_size, patch, mm_tokens = 32, 4, 4  # real: 896, 14, 256
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    vocab, merges = _train_bpe(backend, len(specials) + len(byte_pieces) + 300, specials + byte_pieces)
    tokenizer = GemmaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, padding_side="left",
        boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"], model_max_length=4096,
    )
    image_processor = Gemma3ImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True,
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=_GEMMA3_CHAT_TEMPLATE, image_seq_length=mm_tokens)
    config = Gemma3Config(
        text_config=dict(
            model_type="gemma3_text", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
            max_position_embeddings=1024,
            sliding_window=512,  # shorter than the prompt made prompted captions image-independent
            layer_types=["sliding_attention", "full_attention"],
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, image_size=image_size, patch_size=patch, vision_use_head=False,
        ),
        mm_tokens_per_image=mm_tokens,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers zero-initialises this matrix, which makes a random model ignore the image entirely.
    with torch.no_grad():
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    _zero_unprintable_output_rows(model, tokenizer)
    # Like the real generation_config.json: stop on <eos> or <end_of_turn>, and sample by default.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )
    return model, processor


def _build_internvl(variant):
    """Like OpenGVLab/InternVL3-1B-hf: Qwen2Tokenizer (byte-level BPE, <|im_start|>/<|im_end|>), <img> </img>
    <IMG_CONTEXT> <video> tokens, GotOcr2ImageProcessor tiling (+ thumbnail), pixel-shuffle projector, Qwen2 LM."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import (
        GenerationConfig,
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        Qwen2Tokenizer,
    )
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    image_size, patch = 32, 4  # real: 448, 14
    image_seq_length = (image_size // patch) ** 2 // 4  # 16 tokens per tile after the 0.5 pixel shuffle
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    vocab, merges = _train_bpe(backend, 450, specials, pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        padding_side="left", start_image_token="<img>", end_image_token="</img>",
        context_image_token="<IMG_CONTEXT>", video_token="<video>", extra_special_tokens=["<|im_start|>"],
        model_max_length=8192,
    )
    image_processor = GotOcr2ImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, resample=3, crop_to_patches=True,
        min_patches=1, max_patches=4, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD, do_convert_rgb=True,
    )
    video_processor = InternVLVideoProcessor(size={"height": image_size, "width": image_size},
                                             image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, image_seq_length=image_seq_length,
                                  chat_template=_INTERNVL_CHAT_TEMPLATE)
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=[image_size, image_size], patch_size=[patch, patch],
            initializer_range=0.2,  # with 0.02 every image gives '\n\n\n...'
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, initializer_range=0.2,
        ),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration(config)
    _zero_unprintable_output_rows(model, tokenizer)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, processor


# --------------------------------------------------------------------------------------------------------------------
# oracle


def _chat(image, prompt, system_prompt):
    conversation = []
    if system_prompt is not None:
        conversation.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    text = prompt if prompt is not None else DEFAULT_CHAT_INSTRUCTION
    conversation.append({"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": text}]})
    return conversation


def reference_captions(folder, family, images, prompt=None, max_new_tokens=12, system_prompt=None, num_beams=1,
                       dtype="float32") -> list[str]:
    """Caption ``images`` with a direct transformers call: one batched, greedy ``generate`` (float32, CPU), decoding
    only the newly generated tokens with ``skip_special_tokens=True`` and stripping whitespace. ``num_beams`` > 1:
    beam search (still deterministic); ``dtype``: the weights' dtype (pixel values are cast to it).

    ``prompt`` None means unconditional captioning (BLIP / BLIP-2) or ``DEFAULT_CHAT_INSTRUCTION`` (chat families).
    ``system_prompt`` is used by the chat families only (gemma, intern_vlm)."""
    processor, start, (out,) = _direct_generate(folder, family, images, prompt, system_prompt, num_beams, dtype,
                                                (max_new_tokens,))
    return [text.strip() for text in processor.batch_decode(out[:, start:], skip_special_tokens=True)]


def reference_generation(folder, family, image, prompt=None, max_new_tokens=12, system_prompt=None,
                         dtype="float32") -> tuple[str, int, bool]:
    """One image through a direct ``generate`` (as ``reference_captions``): its caption, the number of tokens
    generated (end-of-text included) and whether it stopped before ``max_new_tokens`` ran out (found by running
    again with a higher limit, without asking which tokens end the text)."""
    processor, start, (out, longer) = _direct_generate(folder, family, [image], prompt, system_prompt, 1, dtype,
                                                       (max_new_tokens, max_new_tokens + 8))
    text = processor.batch_decode(out[:, start:], skip_special_tokens=True)[0].strip()
    # One image: its row is all its own (no padding after an early stop). Greedy decoding continues the same way
    # with a higher limit, so the caption stopped on its own exactly when the longer run gives the same tokens.
    return text, out.shape[1] - start, longer.shape[1] == out.shape[1]


def _direct_generate(folder, family, images, prompt, system_prompt, num_beams, dtype, limits):
    """(processor, the column where the new tokens start, one ``generate`` output per max_new_tokens in
    ``limits``) of the checkpoint at ``folder`` run directly on ``images``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    images = list(images)
    n = len(images)
    processor = AutoProcessor.from_pretrained(folder)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype).to("cpu").eval()

    if family == "blip":
        if prompt is None:
            inputs = processor(images=images, return_tensors="pt")
            start = 1  # output = [DEC] + new tokens
        else:
            inputs = processor(images=images, text=[prompt] * n, padding=True, return_tensors="pt")
            # input_ids = [CLS] + prompt + [SEP]; generate() swaps [CLS] for [DEC] (in place) and drops the last
            # column, so output = [DEC] + prompt + new tokens: the new tokens start at input length - 1.
            start = inputs["input_ids"].shape[1] - 1
    elif family == "blip2":
        if prompt is None:
            inputs = processor(images=images, return_tensors="pt")
            start = model.config.num_query_tokens + 1  # output = [<image>] * nq + [bos] + new tokens
        else:
            inputs = processor(images=images, text=[prompt] * n, padding=True, return_tensors="pt")
            start = inputs["input_ids"].shape[1]
    else:  # gemma, intern_vlm
        conversations = [_chat(img, prompt, system_prompt) for img in images]
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True},
        )
        start = inputs["input_ids"].shape[1]

    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
    with torch.inference_mode():
        outputs = [model.generate(**inputs, do_sample=False, num_beams=num_beams, max_new_tokens=limit)
                   for limit in limits]
    return processor, start, outputs


if __name__ == "__main__":  # `python tests/support/tiny_models.py [FAMILY]`: build (once) and print the folder
    import sys

    print(tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "blip"))
