"""A full-size, randomly initialised BLIP-base checkpoint, built offline once and cached under bench/models/.

Same architecture and so the same compute per token as Salesforce/blip-image-captioning-base: a ViT-B/16
vision encoder at 384x384 (577 tokens) and a BERT-base text decoder with cross-attention (12 layers, 12 heads,
vocab 30524), about 224 M parameters. The processor is the real one's kind: a BlipImageProcessor with the same
settings and a BertTokenizer over a WordPiece vocabulary of the real size (30522 + [DEC] + [ENC]), laid out like
bert-base-uncased's ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103) with made-up word pieces, so that
`python app.py --blip --model-path DIR` loads it like the real checkpoint. The weights are random, so captions
are gibberish; the benchmark pins the caption length (min_new_tokens = max_new_tokens) so the work is the same.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import string
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
MODELS_DIR = BENCH_DIR / "models"
# Bump when the builder changes what it writes; a cached folder with another version is rebuilt.
BUILD_VERSION = 1
INFO_FILE = "bench_checkpoint.json"

VOCAB_SIZE = 30522  # bert-base-uncased; [DEC] and [ENC] are added on top (30524, as in BLIP's text config)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CORPUS_WORDS = ("a photo of woman sitting on the beach with her dog man riding bike down city street two cats "
                "sleeping couch next to remote plate food broccoli and rice table group people standing in front "
                "building red car parked side road running through grass park little girl holding umbrella rain "
                "kitchen stove sink refrigerator airplane flying blue sky over mountains bowl fruit apples bananas "
                "cat laptop keyboard train traveling tracks near station boat floating water at sunset person "
                "skiing snowy hill close up pizza wooden").split()


def blip_base_config(vocab_size: int = VOCAB_SIZE + 2) -> Any:
    """The BlipConfig of Salesforce/blip-image-captioning-base (sizes and special token ids)."""
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
                         bos_token_id=30522, pad_token_id=0, sep_token_id=102, eos_token_id=2),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=384, patch_size=16),
        projection_dim=512,
        image_text_hidden_size=256,
    )


def wordpiece_vocab(size: int = VOCAB_SIZE) -> list[str]:
    """A bert-base-uncased-shaped vocabulary of exactly `size` tokens, made up offline (deterministic)."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(99, 994)]
    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    tokens += chars
    tokens += CORPUS_WORDS
    tokens += ["##" + c for c in chars if c.isalnum()]
    letters = string.ascii_lowercase
    for length in (2, 3):
        for combo in itertools.product(letters, repeat=length):
            piece = "".join(combo)
            tokens += [piece, "##" + piece]
    tokens = list(dict.fromkeys(tokens))
    if len(tokens) < size:
        raise AssertionError(f"generated only {len(tokens)} vocabulary entries")
    return tokens[:size]


def build(out_dir: Path) -> dict[str, Any]:
    """Write the checkpoint (model + processor) into `out_dir`; returns facts about it."""
    import torch
    import transformers
    from transformers import BertTokenizer, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    started = time.perf_counter()
    vocab = {token: index for index, token in enumerate(wordpiece_vocab())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", extra_special_tokens=["[ENC]"],
                              model_max_length=512)
    image_processor = BlipImageProcessor(
        do_resize=True, size={"height": 384, "width": 384}, resample=3, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = blip_base_config(len(tokenizer))
    # The real checkpoint's ids: the decoder's bos is [DEC] (30522), padding 0, [SEP] 102 ends a caption.
    expected = {"bos": (tokenizer.bos_token_id, 30522), "pad": (tokenizer.pad_token_id, 0),
                "sep": (tokenizer.sep_token_id, 102), "len": (len(tokenizer), 30524)}
    wrong = {k: v for k, v in expected.items() if v[0] != v[1]}
    if wrong:
        raise AssertionError(f"tokenizer does not match BLIP-base's ids (got, expected): {wrong}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config).eval()
    init_s = time.perf_counter() - started
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "RANDOM_WEIGHTS").write_text("Random weights with the BLIP-base architecture, for the benchmark: "
                                            "its captions are noise.\n")
    params = sum(p.numel() for p in model.parameters())
    info = {"build_version": BUILD_VERSION, "architecture": "Salesforce/blip-image-captioning-base (random weights)",
            "params": params, "init_s": round(init_s, 2), "build_s": round(time.perf_counter() - started, 2),
            "size_mb": round(sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6, 1),
            "transformers": transformers.__version__, "torch": torch.__version__}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=1))
    return info


def full_checkpoint(folder: Path | None = None) -> tuple[Path, dict[str, Any], bool]:
    """The cached full-size checkpoint folder (built on first use); returns (folder, info, built_now)."""
    folder = Path(folder) if folder else MODELS_DIR / "blip-image-captioning-base-random"
    info_path = folder / INFO_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("build_version") == BUILD_VERSION:
            return folder, info, False
    if (folder / "config.json").is_file() and not info_path.is_file():
        # A checkpoint someone put there (e.g. the real weights via --model-dir): use it as it is.
        return folder, {"architecture": "given checkpoint", "params": None}, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("Building the full-size random BLIP-base checkpoint in %s (once; about 1 GB)", folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        info = build(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, info, True


def tiny_checkpoint() -> tuple[Path, dict[str, Any], bool]:
    """The tests' tiny BLIP checkpoint (seconds to build; for the smoke run)."""
    import sys

    tests_dir = str(BENCH_DIR.parent / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from support.tiny_models import tiny_checkpoint as build_tiny

    folder = build_tiny("blip")
    return folder, {"architecture": "tests/support/tiny_models.py BLIP (tiny, random)", "params": None}, False
