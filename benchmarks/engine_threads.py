"""Continuous batching against threads on one Generator: aggregate tok/s for 1 and N concurrent clients.

    python benchmarks/engine_threads.py models/smollm2-static-128 8

Each client asks for 64 greedy tokens (eos ignored) after its own 24-token prompt; median of 3 runs.
"""

import threading, time, sys, statistics
from kvgraph.runtime import Generator
from kvgraph.runtime.engine import BatchEngine
directory, n = sys.argv[1], int(sys.argv[2])
ids=list(range(1000,1024))
def run(fn, clients):
    done=[]
    def c(i): done.append(len(fn([t+i for t in ids])))
    th=[threading.Thread(target=c,args=(i,)) for i in range(clients)]
    t=time.perf_counter(); [x.start() for x in th]; [x.join() for x in th]; return sum(done)/(time.perf_counter()-t)
g=Generator.load(directory); eng=BatchEngine(Generator.load(directory), max_batch=8)
gen=lambda p: g.generate(p,max_new_tokens=64,min_new_tokens=64).token_ids
e=lambda p: eng.generate(p,max_new_tokens=64,min_new_tokens=64).token_ids
for clients in (1, n):
    print(clients, "clients: Generator threads %.1f tok/s, engine %.1f tok/s"%(statistics.median([run(gen,clients) for _ in range(3)]), statistics.median([run(e,clients) for _ in range(3)])))
eng.close()
