"""Hugging Face transformers: BERT and GPT-2 built from small configs (no download), converted exactly, trained
one task per Trainer.train() with SupsupCallback, and task inference on models returning a ModelOutput."""

import copy
import warnings

import pytest
import torch
from _frameworks import convert, need

import supsup_fast as sf
from supsup_fast import BankFileError

transformers = need("transformers")
from supsup_fast.integrations.huggingface import SupsupCallback  # noqa: E402

transformers.logging.set_verbosity_error()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2, max_position_embeddings=16)
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def marker_task(marker, n, seed):
    """Class 1 iff the sequence starts with token ``marker``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (n, 10), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    ids[:, 0] = torch.where(y == 1, marker, ids[:, 0])
    return [{"input_ids": ids[i], "labels": y[i]} for i in range(n)], ids, y


def test_bert_converts_exactly_and_freezes_all_but_the_task():
    dense = tiny_bert()
    x = torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        want = dense(input_ids=x).logits
    model = copy.deepcopy(dense)
    with pytest.warns(sf.ConversionWarning, match=r"stay dense \(frozen\): Embedding x3"):
        sf.convert_(model, sf.SupsupConfig(base="pretrained", density=1.0), modules_to_save=["classifier"])
    assert not any(p.requires_grad for p in model.parameters())
    with sf.task(model) as params:
        assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)


def test_trainer_callback_trains_one_task_per_train_call(tmp_path):
    model = convert(tiny_bert(), sf.SupsupConfig(base="pretrained", density=0.5), modules_to_save=["classifier"])
    cb = SupsupCallback(name="marker1")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=5e-3, num_train_epochs=3, per_device_train_batch_size=32,
        report_to=[], logging_strategy="no", save_strategy="no", use_cpu=True, disable_tqdm=True)
    data1, x1, y1 = marker_task(1, 384, 0)
    data2, x2, y2 = marker_task(2, 384, 1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data1, callbacks=[cb])
    trainer.train()
    cb.name, trainer.train_dataset = "marker2", data2
    trainer.train()  # the same Trainer and optimizer: the callback points it at the new task's scores
    assert sf.tasks(model) == ["marker1", "marker2"] and cb.frozen == [0, 1]
    model.eval()
    for name, x, y in (("marker1", x1, y1), ("marker2", x2, y2)):
        sf.set_task(model, name)
        with torch.no_grad():
            acc = (model(input_ids=x).logits.argmax(-1) == y).float().mean().item()
        assert acc > 0.9, (name, acc)
    # saved, then loaded into a fresh BERT with the same pretrained weights: the per-task classifiers come back
    sf.save_pretrained(model, tmp_path / "bank")
    fresh = sf.from_pretrained(tiny_bert(), tmp_path / "bank").eval()
    assert sf.tasks(fresh) == ["marker1", "marker2"]
    for name, x in (("marker1", x1), ("marker2", x2)):
        sf.set_task(model, name)
        sf.set_task(fresh, name)
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=x[:64]).logits, model(input_ids=x[:64]).logits,
                                       rtol=0, atol=0)
    # task inference reads the ModelOutput's logits
    inf = sf.inference.infer_task(model, x1[:8], batch_mode="per_example")
    assert inf.task_ids.shape == (8,) and set(inf.task_ids.tolist()) <= {0, 1}
    inf = sf.inference.infer_task(model, x1[:8], logits_fn=lambda out: out.logits[:, :2], rows=None)
    assert inf.task_ids.shape == (1,)


def test_gpt2_conv1d_is_masked_and_the_lm_head_tie_kept(tmp_path):
    dense = tiny_gpt2()
    x = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        want = dense(input_ids=x).logits
    model = copy.deepcopy(dense)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sf.convert_(model, sf.SupsupConfig(base="pretrained", density=1.0))
    assert any("lm_head" in str(w.message) for w in rec)
    s = sf.summary(model)
    assert s.converted == {"Conv1D -> MaskedLinear": 8}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "tied to 'transformer.wte'" in dict((r[0], r[3]) for r in s.dense)["lm_head"]
    with sf.task(model, name="lm"):
        pass
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
    merged = sf.merge_task(model, "lm")
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
    # a bank holds the masks, not the embeddings: a GPT-2 with other embeddings refuses it
    sf.checkpoint.save_bank(model, tmp_path / "b")
    other = convert(tiny_gpt2(seed=1), sf.SupsupConfig(base="pretrained", density=1.0))
    with pytest.raises(BankFileError, match="belongs to a"):
        sf.checkpoint.load_bank(other, tmp_path / "b")
    # the last position's logits over the vocabulary, for task inference on a language model
    inf = sf.inference.infer_task(model, x, logits_fn=lambda out: out.logits[:, -1])
    assert inf.task_ids.tolist() == [0]


def test_gpt2_tasks_trained_on_the_lm_loss_save_and_reload(tmp_path):
    model = convert(tiny_gpt2(), sf.SupsupConfig(base="pretrained", density=0.5))
    x = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name in ("a", "b"):
        with sf.task(model, name=name) as params:
            opt = torch.optim.Adam(params, lr=0.05)
            model.train()
            for _ in range(3):
                opt.zero_grad()
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                opt.step()
                losses.setdefault(name, []).append(loss.item())
    assert all(v[-1] < v[0] for v in losses.values()), losses
    model.eval()
    sf.save_pretrained(model, tmp_path / "pre")
    fresh = sf.from_pretrained(tiny_gpt2(), tmp_path / "pre").eval()
    assert sf.tasks(fresh) == ["a", "b"] and fresh.lm_head.weight is fresh.transformer.wte.weight
    outs = {}
    for name in ("a", "b"):
        sf.set_task(model, name)
        sf.set_task(fresh, name)
        with torch.no_grad():
            outs[name] = model(input_ids=x).logits
            torch.testing.assert_close(fresh(input_ids=x).logits, outs[name], rtol=0, atol=0)
    assert not torch.equal(outs["a"], outs["b"])


def test_peft_lora_layers_convert_around_their_base_layer():
    peft = need("peft")
    base = tiny_bert()
    x = torch.randint(0, 40, (2, 9))
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    lora.eval()
    with torch.no_grad():
        want = lora(input_ids=x).logits
    convert(lora, sf.SupsupConfig(base="pretrained", density=1.0))
    with sf.task(lora):
        with torch.no_grad():
            torch.testing.assert_close(lora(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
