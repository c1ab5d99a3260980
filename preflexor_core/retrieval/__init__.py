"""Graph retriever: chunking, embeddings (from-scratch MiniLM/BERT + hashing fallback), an
hnswlib/exact vector index and a networkx knowledge graph, behind ``GraphRetriever``.

References: PRefLexOR (arXiv 2410.12375) uses retrieval over the corpus to build the thinking
scratchpads of its on-the-fly preference data; see the submodules for the rest.

Run: ``python -m preflexor_core.retrieval.retriever CORPUS --query "..."``.
"""
from .chunking import Chunk, CorpusError
from .embedding import Embedder, EmbedderError, HashingEmbedder, MiniLMEmbedder, default_embedder
from .graph import KnowledgeGraph
from .index import ExactIndex, HnswIndex
from .retriever import EmbedderMismatchError, Expansion, GraphRetriever, Hit

__all__ = ["GraphRetriever", "Hit", "Expansion", "Chunk", "MiniLMEmbedder", "HashingEmbedder",
           "default_embedder", "Embedder", "KnowledgeGraph", "ExactIndex", "HnswIndex",
           "CorpusError", "EmbedderError", "EmbedderMismatchError"]
