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
        # chunks sum in another order: float32 rounding, 1e-5 of the tensor's scale (gradients here reach ~6)
        assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())
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


WORLD, PER_RANK = 2, 3  # processes, queries per process


def _encoder_net() -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights in every process
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))


def _global_batch():
    """Every process's (queries, positives, hard negatives) inputs, (WORLD, PER_RANK, 6) each."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD, PER_RANK, 6, generator=generator) for _ in range(3)]


def _one_process_reference() -> tuple[float, list[torch.Tensor]]:
    """Loss and gradients of one process on the global batch: every query against every document."""
    net = _encoder_net()
    queries, positives, negatives = (x.flatten(0, 1) for x in _global_batch())
    documents = net(torch.cat([positives, negatives]))  # the same documents as the gathered ones, reordered
    loss = ContrastiveLoss(temperature=0.5, gather_across_processes=False)(net(queries), documents)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in net.parameters()]


def _gather_worker(rank, world, port, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    queries, positives, negatives = (x[rank] for x in _global_batch())
    loss_fn = ContrastiveLoss(temperature=0.5)

    def mean_over_processes(net, loss) -> tuple[float, list[torch.Tensor]]:
        """What DDP does to the gradients: their mean over the processes (and the loss's, for the log)."""
        grads = [p.grad.clone() for p in net.parameters()]
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total.item() / world, grads

    # 1. plain: one forward over this process's texts, the loss gathers the documents, backward
    net = _encoder_net()
    vectors = net(torch.cat([queries, positives, negatives]))
    loss = loss_fn(vectors[:PER_RANK], vectors[PER_RANK:])
    loss.backward()
    plain = mean_over_processes(net, loss)

    # 2. GradCache under DDP in chunks of 2 texts: DDP averages the gradients at the last chunk
    net = DistributedDataParallel(_encoder_net())
    features = list(torch.cat([queries, positives, negatives]))
    cache = GradCache(net, torch.stack, loss_fn, chunk_size=2)
    cached_loss = cache.step(features, num_queries=PER_RANK, no_sync=net.no_sync)
    total = cached_loss.clone()
    dist.all_reduce(total)
    cached = total.item() / world, [p.grad.clone() for p in net.parameters()]

    # 3. the old gather (other processes' rows as constants): must differ, or this test proves nothing
    net = _encoder_net()
    vectors = net(torch.cat([queries, positives, negatives]))
    documents = vectors[PER_RANK:]
    parts = [torch.empty_like(documents) for _ in range(world)]
    dist.all_gather(parts, documents.detach().contiguous())
    parts[rank] = documents
    scores = (
        torch.nn.functional.normalize(vectors[:PER_RANK], dim=-1)
        @ torch.nn.functional.normalize(torch.cat(parts), dim=-1).T
    )
    labels = torch.arange(PER_RANK) + rank * len(documents)
    old_loss = torch.nn.functional.cross_entropy(scores / 0.5, labels)
    old_loss.backward()
    detached = mean_over_processes(net, old_loss)

    results[rank] = {"plain": plain, "cached": cached, "detached": detached}
    dist.destroy_process_group()


def test_gradients_across_processes_equal_one_process_on_the_global_batch():
    """2 gloo processes, each with 3 queries (+ positives, hard negatives): the loss sees all 12 documents,
    and the averaged parameter gradients equal those of one process on all 6 queries and 12 documents,
    with the plain loss and with GradCache under DDP."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(WORLD, port, results), nprocs=WORLD, join=True)
    reference_loss, reference_grads = _one_process_reference()
    for rank in range(WORLD):
        for name in ("plain", "cached"):
            loss, grads = results[rank][name]
            assert abs(loss - reference_loss) < 1e-5, (rank, name, loss, reference_loss)
            for got, expected in zip(grads, reference_grads, strict=True):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=f"rank {rank}, {name}")
        old_grads = results[rank]["detached"][1]
        gap = max((a - b).abs().max().item() for a, b in zip(old_grads, reference_grads, strict=True))
        assert gap > 1e-3, f"a gather without cross-process gradients should differ, gap {gap}"
