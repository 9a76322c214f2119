"""Clustering: k-means on embeddings with k = the number of gold labels, scored by V-measure (x100).

Reads the same labelled files as classification (:func:`~decoder2vec.eval.classification.read_labelled_texts`):
the labels are the gold clusters. scikit-learn's ``KMeans`` (seeded) clusters the embeddings and
``v_measure_score`` compares the clusters with the labels (the harmonic mean of homogeneity and completeness).

Example::

    from decoder2vec.eval.classification import read_labelled_texts
    from decoder2vec.eval.clustering import ClusteringEvaluator

    data = read_labelled_texts("trec_test.label", encoding="latin-1")
    print(ClusteringEvaluator(data)(encoder))  # {'v_measure': ...}
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import v_measure_score

from .classification import LabelledTexts
from .common import embed

__all__ = ["ClusteringEvaluator"]


class ClusteringEvaluator:
    """Clusters the embeddings of ``data.texts`` into as many groups as ``data.labels`` has, then scores them.

    Inputs: :class:`LabelledTexts`; ``instruction`` goes before every text; ``seed`` fixes k-means'
    initialisation (``n_init`` restarts, the best inertia wins). Returns ``{"v_measure"}`` (x100), the primary
    metric. Vectors are L2-normalised first, so k-means groups by direction as cosine similarity does.

    Example::

        data = LabelledTexts(["cats purr", "kittens meow", "stocks fell", "markets rose"], ["pet", "pet", "money", "money"])
        ClusteringEvaluator(data)(encoder)  # {'v_measure': 100.0} when the encoder separates pets from money
    """

    primary_metric = "v_measure"

    def __init__(
        self,
        data: LabelledTexts,
        *,
        instruction: str | None = None,
        seed: int = 42,
        n_init: int = 10,
        batch_size: int = 32,
        show_progress: bool | None = None,
    ):
        clusters = len(set(data.labels))
        if clusters < 2 or clusters > len(data.texts):
            raise ValueError(
                f"clustering needs at least 2 labels and no more labels than texts, got {clusters} labels"
            )
        self.data = data
        self.instruction = instruction
        self.seed = seed
        self.n_init = n_init
        self.batch_size = batch_size
        self.show_progress = show_progress

    def __call__(self, encoder) -> dict[str, float]:
        vectors = embed(
            encoder,
            self.data.texts,
            instruction=self.instruction,
            batch_size=self.batch_size,
            show_progress=self.show_progress,
        )
        vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)  # (n, dim)
        kmeans = KMeans(n_clusters=len(set(self.data.labels)), n_init=self.n_init, random_state=self.seed)
        predicted = kmeans.fit_predict(vectors)
        return {"v_measure": float(v_measure_score(self.data.labels, predicted)) * 100}
