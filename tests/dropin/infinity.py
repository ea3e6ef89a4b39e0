"""infinity-client against a server (argv[1] = URL, argv[2] = the rerank model); runs in
.venv-clients-infinity. Prints what it parsed as JSON."""

import json
import sys

from infinity_client import Client
from infinity_client.api.default import embeddings, models, rerank
from infinity_client.models import OpenAIEmbeddingInputText, RerankInput

url, reranker = sys.argv[1], sys.argv[2]
TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten naps."]
client = Client(base_url=url, raise_on_unexpected_status=True)
out = {}
emb = embeddings.sync(client=client, body=OpenAIEmbeddingInputText.from_dict({"input": TEXTS}))
out["embeddings"] = [d.embedding for d in emb.data]
rr = rerank.sync(client=client, body=RerankInput.from_dict(
    {"query": "Where is the cat?", "documents": TEXTS, "model": reranker,
     "return_documents": True}))
out["rerank"] = [[r.index, r.relevance_score, r.document] for r in rr.results]
out["models"] = [m.id for m in models.sync(client=client).data]
print(json.dumps(out))
