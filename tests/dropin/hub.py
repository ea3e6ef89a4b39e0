"""Drives the huggingface_hub / cohere / llama-index clients against a server (argv[1] = its
URL, argv[2] = the rerank model); prints what each client returned as one JSON object.
Runs in .venv-clients-hub (scripts/setup-client-envs.sh hub)."""

import json
import sys

url, reranker = sys.argv[1], sys.argv[2]
TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten naps."]
QUERY = "Where is the cat?"
out = {}

from huggingface_hub import InferenceClient  # noqa: E402

# provider "hf-inference": the one whose endpoint info and health check read a URL
hf = InferenceClient(model=url, provider="hf-inference")
out["hf_feature_extraction"] = hf.feature_extraction(TEXTS).tolist()
out["hf_feature_extraction_one"] = hf.feature_extraction(TEXTS[0]).tolist()
out["hf_sentence_similarity"] = hf.sentence_similarity(QUERY, TEXTS)
out["hf_endpoint_info"] = hf.get_endpoint_info()
out["hf_health"] = hf.health_check()

from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference  # noqa

tei = TextEmbeddingsInference(model_name="tei", base_url=url, timeout=60)
out["llama_tei_embed"] = tei.get_text_embedding_batch(TEXTS)

from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402
from llama_index.postprocessor.jinaai_rerank import JinaRerank  # noqa: E402
from llama_index.postprocessor.tei_rerank import TextEmbeddingInference as TEIRerank  # noqa

nodes = [NodeWithScore(node=TextNode(text=t, id_=str(i))) for i, t in enumerate(TEXTS)]
ranked = TEIRerank(base_url=url, top_n=3).postprocess_nodes(nodes, QueryBundle(QUERY))
out["llama_tei_rerank"] = [[n.node.id_, n.score] for n in ranked]
jina = JinaRerank(api_key="unused", base_url=url + "/v1", model=reranker, top_n=2)
out["llama_jina_rerank"] = [[n.node.id_, n.score]
                            for n in jina.postprocess_nodes(nodes, QueryBundle(QUERY))]

import cohere  # noqa: E402

v1 = cohere.Client(api_key="unused", base_url=url)
r = v1.rerank(model=reranker, query=QUERY, documents=TEXTS, return_documents=True, top_n=2)
out["cohere_v1"] = [[x.index, x.relevance_score, x.document.text] for x in r.results]
v2 = cohere.ClientV2(api_key="unused", base_url=url)
r = v2.rerank(model=reranker, query=QUERY, documents=TEXTS)
out["cohere_v2"] = [[x.index, x.relevance_score] for x in r.results]
try:
    v2.rerank(model="no/such-model", query=QUERY, documents=TEXTS)
except cohere.core.api_error.ApiError as exc:
    out["cohere_v2_error"] = [exc.status_code, exc.body]

print(json.dumps(out))
