"""LitServe echo server for bench_gateway.py: run with the peers' venv python, never inferd's.

POST /predict {"prompt"} -> {"text"}; POST /stream {"prompt"} -> one SSE event per word, then [DONE].
Defaults otherwise (one inference worker on the CPU), as a user would start it.
"""

import json
import sys

import litserve as ls


class Echo(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return request["prompt"]

    def predict(self, prompt):
        return prompt

    def encode_response(self, output):
        return {"text": output}


class EchoStream(Echo):
    def predict(self, prompt):
        yield from prompt.split()

    def encode_response(self, outputs):
        for word in outputs:
            yield "data: " + json.dumps({"text": word}) + "\n\n"
        yield "data: [DONE]\n\n"


if __name__ == "__main__":
    server = ls.LitServer([Echo(api_path="/predict"), EchoStream(api_path="/stream", stream=True)],
                          accelerator="cpu")
    server.run(host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", generate_client_file=False)
