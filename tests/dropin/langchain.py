"""langchain-huggingface's HuggingFaceEndpointEmbeddings against a server (argv[1] = URL);
runs in .venv-clients-langchain. Prints its vectors as JSON."""

import json
import sys

from langchain_huggingface import HuggingFaceEndpointEmbeddings

TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten naps."]
emb = HuggingFaceEndpointEmbeddings(model=sys.argv[1])
print(json.dumps({"documents": emb.embed_documents(TEXTS), "query": emb.embed_query(TEXTS[0])}))
