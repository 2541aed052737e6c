"""A verifiable toy task for tests, benchmarks and a first look at the RL graph without any
download: a character-level tokenizer (16 ids) with a tiny random Llama saved as an HF
directory, and digit prompts whose right answer is always "7" (the `prefix_match` rule
scores it), which a policy learns from chance in a few dozen iterations."""
import json

CHARS = list("0123456789,: ")
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no special tokens


def char_model(path: str, seed: int = 0) -> str:
    """A character-level tokenizer (16 ids) and a tiny random Llama as an HF directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=1, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def digit_prompts(path: str, n: int = 48) -> str:
    """``n`` prompts "a,a+1,a+2:" (JSONL with prompt, answer and id), drawn with a fixed seed."""
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            a = rng.randrange(10)
            f.write(json.dumps({"prompt": f"{a},{(a + 1) % 10},{(a + 2) % 10}:", "answer": "7", "id": i}) + "\n")
    return path
