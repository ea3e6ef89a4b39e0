"""langchain-huggingface's HuggingFaceEndpointEmbeddings against a server (argv[1] = URL);
runs in .venv-clients-langchain. Prints its vectors as JSON.

langchain-huggingface 1.2.3 refuses a URL as `model` (it routes repo ids through Hugging
Face's router); a TEI server is reached by giving it huggingface_hub clients pointed at the
server's URL, which its embed calls then use."""

import asyncio
import json
import sys

from huggingface_hub import AsyncInferenceClient, InferenceClient
from langchain_huggingface import HuggingFaceEndpointEmbeddings

url = sys.argv[1]
TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten naps."]
emb = HuggingFaceEndpointEmbeddings(model="sentence-transformers/all-MiniLM-L6-v2")
emb.client, emb.async_client = InferenceClient(model=url), AsyncInferenceClient(model=url)
print(json.dumps({"documents": emb.embed_documents(TEXTS), "query": emb.embed_query(TEXTS[0]),
                  "async": asyncio.run(emb.aembed_documents(TEXTS))}))
