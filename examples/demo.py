"""kiln's demo: greedy, sampled and chat generations from the embedded SmolLM2-135M-Instruct,
compiled (the first run compiles every batch size into the kiln cache; later runs load it)."""

import logging
import time

from kiln import LLM, SamplingParams

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

start = time.perf_counter()
llm = LLM()
print(f"ready in {time.perf_counter() - start:.1f} s\n")

prompt = "The three most important inventions of the 20th century are"
greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=48))[0]
print(f"--- greedy ---\n{prompt}{greedy.outputs[0].text}\n")

sampled = llm.generate(prompt, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=48,
                                              seed=0))[0]
print(f"--- sampled (temperature 0.8, top_p 0.95, seed 0) ---\n{prompt}{sampled.outputs[0].text}\n")

question = "What is the capital of France?"
answer = llm.chat([{"role": "user", "content": question}],
                  SamplingParams(temperature=0, max_tokens=64))[0]
print(f"--- chat ---\nuser: {question}\nassistant: {answer.outputs[0].text}")
