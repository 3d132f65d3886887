import sys, json, asyncio, requests, websockets
port=sys.argv[1]; base=f'http://127.0.0.1:{port}'
for i in range(20):
    requests.post(base+'/v1/events', json={'type':'x.y','data':{'i':i}})
r=requests.get(base+'/v1/events?since=1-0'); print('list since trimmed', r.status_code, r.text[:300])
r=requests.get(base+'/v1/events'); print('list', r.status_code, [e['id'] for e in r.json()['events']])
r=requests.get(base+'/v1/events/sse?since=1-0', stream=True, timeout=2)
print('sse', r.status_code)
try:
    for i,l in enumerate(r.iter_lines(decode_unicode=True)):
        print('  SSE|', l[:200])
        if i>10: break
except Exception as e: print(' sse end', type(e).__name__)
async def ws():
    async with websockets.connect(f'ws://127.0.0.1:{port}/v1/events/ws?since=1-0') as w:
        for _ in range(3):
            print('  WS|', (await asyncio.wait_for(w.recv(), 2))[:200])
asyncio.run(ws())
