import copy

import pytest
import torch

import modelpress as mp
from modelpress.quant import QuantLinear

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it (modelpress[train])


class Data(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 60, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 30).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def test_qat_and_distillation_inside_a_trainer_run(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from modelpress.train.hf_callback import ModelpressCallback

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=60, num_labels=2)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(cfg).eval()
    student = copy.deepcopy(teacher)
    mp.prepare_qat_(student, mp.QuantConfig(weights="int4:g16", exclude=["re:.*embeddings.*"]))
    distiller = mp.Distiller(teacher, student, mp.DistillConfig(task=1.0, output=1.0, temperature=2.0))
    before = student.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-3)
    trainer = Trainer(model=student, args=args, train_dataset=Data(), compute_loss_func=distiller.trainer_loss,
                      callbacks=[ModelpressCallback(distiller, freeze_ranges_after=2)])
    trainer.train()
    q = student.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, QuantLinear)  # converted at the end of training
    assert not torch.equal(q.dequantized_weight(), mp.formats.fake_quantize(before, "int4:g16"))  # it trained
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not student._forward_pre_hooks  # the distiller let go of the student
