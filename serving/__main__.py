"""`python -m serving --config serving/configs/serve.yaml [key=value ...]` runs serving.serve.main."""

from ingest.config import parse_config
from serving.serve import Config, main

main(parse_config(Config))
