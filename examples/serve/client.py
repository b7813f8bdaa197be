"""Eight concurrent queries on a model served by `lmq serve-model` (see README.md here).

    python examples/serve/client.py MODEL_PATH [HOST:PORT]
"""

import asyncio
import sys

import lmq


@lmq.query
async def capital(country):
    '''lmq
    "Q: What is the capital of {country}?\nA:[CITY]" where STOPS_AT(CITY, ".") and len(TOKENS(CITY)) < 20
    return CITY.strip()
    '''


async def main(path: str, endpoint: str) -> None:
    model = lmq.model(f"llama.cpp:{path}", endpoint=endpoint)
    countries = ["France", "Italy", "Spain", "Japan", "Kenya", "Peru", "Canada", "Norway"]
    answers = await asyncio.gather(*(capital(c, model=model) for c in countries))
    for country, answer in zip(countries, answers):
        print(f"{country}: {answer}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "localhost:8080"))
