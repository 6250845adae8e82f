"""The PyTorch embedders (config.eval.backend="torch") from a tiny random CLIP directory."""
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from holocine_jax.eval import metrics as M
from holocine_jax.eval.embedders import ClipTextEmbedder, TransformersImageEmbedder
from holocine_jax.eval.scorers import load_scorers

WORDS = ["[UNK]", "<|startoftext|>", "<|endoftext|>", "a", "red", "circle", "blue", "square"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
        bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(WORDS), max_position_embeddings=16, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(path)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                             crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=images, tokenizer=fast).save_pretrained(path)
    return path


def test_clip_semantic_score_is_clip_cosine(clip_dir):
    frame = np.random.default_rng(0).integers(0, 256, (1, 48, 48, 3), dtype=np.uint8)
    scorers = M.Scorers(clip=TransformersImageEmbedder(clip_dir),
                        clip_text=ClipTextEmbedder(clip_dir), text_alignment=None)
    got = M.film_values(frame, [], scorers=scorers, global_caption="a red circle",
                        captions=["blue square"])
    processor = transformers.AutoProcessor.from_pretrained(clip_dir)
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    inputs = processor(text=["a red circle", "blue square"], images=list(frame),
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    want = out.logits_per_image[0] / model.logit_scale.exp()
    assert got["semantic_global"] == pytest.approx([float(want[0])], abs=1e-5)
    assert got["semantic_shot"] == pytest.approx([float(want[1])], abs=1e-5)


def test_torch_backend_scorers(clip_dir):
    from holocine_jax.config import load_config

    config = load_config("tiny", [f"--config.eval.clip={clip_dir}", "--config.eval.backend=torch",
                                  "--config.eval.cut_detector=frame_difference"])
    scorers = load_scorers(config)
    rng = np.random.default_rng(1)
    shot = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    assert scorers.clip(shot).shape == (3, 16)
    got = M.film_values(np.concatenate([shot, shot]), [3], scorers=scorers)
    assert got["inter_shot_consistency"] == pytest.approx([1.0], abs=1e-5)
    assert scorers.names["clip"].startswith("CLIP") and scorers.names["subject"] == "built-in pixel embedder"
    config.eval.clip = "/nonexistent/clip"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_scorers(config)
