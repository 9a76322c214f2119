import math
import os

import pytest
import torch

from decoder2vec import Encoder
from decoder2vec.train import ContrastiveLoss, GradCache, SupervisedConfig, set_dropout
from decoder2vec.train.run import _add_lora
from decoder2vec.train.stages import supervised_stage


def test_contrastive_loss_hand_example_with_hard_negatives():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    documents = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 1.0], [1.0, 0.0]])  # positives, then hard negatives
    # query 0: cosines (1, 0, 0, 1) -> -log(e / (2e + 2)); query 1: cosines (0, 1, 1, 0), the same
    expected = math.log((2 * math.e + 2) / math.e)
    assert ContrastiveLoss(temperature=1.0)(queries, documents).item() == pytest.approx(expected, abs=1e-6)


def _lora_encoder(path, attention_dropout=0.0):
    encoder = Encoder.from_pretrained(str(path), device="cpu")
    encoder.model = _add_lora(encoder.model, SupervisedConfig(lora_dropout=0.0))
    for p in encoder.model.parameters():  # LoRA B starts at zero: give the adapter some weight
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    set_dropout(encoder.model, attention=attention_dropout)
    return encoder.train()


QUERIES = ["what is the capital of France?", "who plays a guitar?", "what is sliced?"]
DOCUMENTS = [
    "Paris is the capital of France.",
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The cat sits on the mat.",
    "Numbers like 3.14 appear in text.",
    "Emoji 🙂 and accents éàü.",
]


def _features(encoder):
    return encoder.tokenize(QUERIES, instruction="Retrieve a passage") + encoder.tokenize(DOCUMENTS)


@pytest.mark.parametrize("chunk_size, dropout", [(2, 0.0), (4, 0.0), (100, 0.3)])
def test_grad_cache_equals_plain_loss_and_gradients(tiny_llama_dir, chunk_size, dropout):
    encoder = _lora_encoder(tiny_llama_dir, attention_dropout=dropout)
    loss_fn = ContrastiveLoss(temperature=0.05)
    features = _features(encoder)
    params = [p for p in encoder.parameters() if p.requires_grad]

    torch.manual_seed(7)
    vectors = encoder(encoder.collate(features))
    plain = loss_fn(vectors[:3], vectors[3:])
    plain.backward()
    plain_grads = [p.grad.clone() for p in params]
    encoder.zero_grad()

    torch.manual_seed(7)
    cached = GradCache(encoder, encoder.collate, loss_fn, chunk_size=chunk_size).step(features, num_queries=3)
    assert abs(cached.item() - plain.item()) < 1e-5
    for a, b in zip(plain_grads, [p.grad for p in params], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert any(g.abs().sum() > 0 for g in plain_grads)


def test_instruction_only_on_queries(tiny_llama_dir, tmp_path):
    encoder = Encoder.from_pretrained(str(tiny_llama_dir), device="cpu")
    rows = tmp_path / "rows.tsv"
    rows.write_text("".join(f"{q}\t{d}\n" for q, d in zip(QUERIES, DOCUMENTS, strict=False)))
    config = SupervisedConfig(model=str(tiny_llama_dir), data=[str(rows)], instruction="Find the answer")
    stage = supervised_stage(config, encoder)
    seen = []

    def module(batch):
        seen.append(batch)
        return encoder(batch)

    stage.step(module, stage.examples, None, backward=lambda loss: None)
    batch = seen[0]
    plain = encoder.collate(encoder.tokenize(QUERIES))  # the same queries without instruction
    read_more = batch["attention_mask"][:3].sum(1) > plain["attention_mask"].sum(1)
    assert read_more.all()  # queries read the instruction ...
    assert torch.equal(batch["pool_mask"][:3].sum(1), plain["pool_mask"].sum(1))  # ... but pool only their text
    docs = encoder.collate(encoder.tokenize(DOCUMENTS[:3]))
    assert torch.equal(batch["attention_mask"][3:].sum(1), docs["attention_mask"].sum(1))  # documents: no instruction


def _gather_worker(rank, world, port, results):
    import torch.distributed as dist

    from decoder2vec.train.supervised import ContrastiveLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(0)
    all_queries = torch.randn(world, 2, 4, generator=generator)
    all_documents = torch.randn(world, 3, 4, generator=generator)
    queries = all_queries[rank].clone().requires_grad_()
    documents = all_documents[rank].clone().requires_grad_()
    loss = ContrastiveLoss(temperature=0.5)(queries, documents)
    loss.backward()
    # the same loss in one process: this rank's queries against every rank's documents
    q_ref = all_queries[rank].clone().requires_grad_()
    d_ref = all_documents.clone().requires_grad_()
    scores = (
        torch.nn.functional.normalize(q_ref, dim=-1) @ torch.nn.functional.normalize(d_ref.flatten(0, 1), dim=-1).T
    )
    reference = torch.nn.functional.cross_entropy(scores / 0.5, torch.arange(2) + rank * 3)
    reference.backward()
    results[rank] = (
        abs(loss.item() - reference.item()),
        (queries.grad - q_ref.grad).abs().max().item(),
        (documents.grad - d_ref.grad[rank]).abs().max().item(),
    )
    dist.destroy_process_group()


def test_negatives_are_gathered_across_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(2, port, results), nprocs=2, join=True)
    for rank in range(2):
        assert max(results[rank]) < 1e-6, results[rank]
