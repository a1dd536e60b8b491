from __future__ import annotations


def test_tiny_models_load(tiny_bert_dir, tiny_llm_dir):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    assert tok.vocab_size > 100
    ids = tok("who was the first king")["input_ids"]
    assert tok.unk_token_id not in ids
    enc = tok(["who was the first king"], ["the first king of england"], return_tensors="pt")
    out = AutoModel.from_pretrained(tiny_bert_dir)(**enc)
    assert out.last_hidden_state.shape[-1] == 32

    ltok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    text = ltok.apply_chat_template(
        [{"role": "user", "content": "who won"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = ltok(text, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    gen = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 3 or gen[0, -1].item() == ltok.eos_token_id
    assert torch.isfinite(model(**ids).logits).all()
