/**
 * The seed's chain on a live hookline, end to end (HOOKLINE_URL, HOOKLINE_API_KEY; skipped
 * without them). A loopback server plays CloudBase HTTP access for hooklineWebhook and is
 * registered with `POST /v1/webhooks`; photography creates the task from a photo the same server
 * serves (as cloud storage would); hookline's signed webhook then completes the `works` record
 * with the result image, and a replayed or forged delivery changes nothing.
 * tests/integration/test_cloudbase_example.py starts the hookline and runs this.
 */

'use strict';

const assert = require('node:assert/strict');
const { after, before, describe, it } = require('node:test');
const cloud = require('wx-server-sdk');
const photography = require('../cloudfunctions/photography');
const webhook = require('../cloudfunctions/hooklineWebhook');
const { callAs, installCloudBase, png } = require('./support/cloudbase');
const { cloudbaseHttpAccess } = require('./support/http');

const LIVE = process.env.HOOKLINE_URL && process.env.HOOKLINE_API_KEY;
const skip = LIVE ? false : 'needs a live hookline: HOOKLINE_URL and HOOKLINE_API_KEY';
const OPENID = 'oE2e_0123456789abcdefghijkl';
const PHOTO = `cloud://test-env.7465-test-env/photos/${OPENID}/selfie.png`;
const WAIT_MS = 30000; // a generous bound: a hang fails, speed is not what is tested

describe('photography → hookline → hooklineWebhook, end to end', { skip }, () => {
  const base = (process.env.HOOKLINE_URL || '').replace(/\/+$/, '');
  const auth = { authorization: `Bearer ${process.env.HOOKLINE_API_KEY}` };
  const image = png(80, 60, [200, 120, 40]);
  let cb;
  let access;
  let endpoint;
  let result;

  before(async () => {
    cb = installCloudBase(cloud);
    access = await cloudbaseHttpAccess(webhook.main, (req, res) => {
      if (req.url !== '/photos/selfie.png') return false;
      res.writeHead(200, { 'content-type': 'image/png', 'content-length': image.length });
      res.end(image);
      return true;
    });
    cb.files.set(PHOTO, `${access.url}/photos/selfie.png`);
  });

  after(async () => {
    if (endpoint) {
      // forget the receiver, which closes now (best effort: the server's own tests cover DELETE)
      await fetch(`${base}/v1/webhooks/${endpoint.id}`, { method: 'DELETE', headers: auth }).catch(() => {});
    }
    cb.restore();
    await access.close();
  });

  it('registers the HTTP-access path with POST /v1/webhooks and keeps its secret', async () => {
    const response = await fetch(`${base}/v1/webhooks`, {
      method: 'POST',
      headers: { ...auth, 'content-type': 'application/json' },
      body: JSON.stringify({ url: `${access.url}/hookline-webhook` }),
    });
    const body = await response.text();
    assert.equal(response.status, 201, `POST /v1/webhooks answered ${response.status}: ${body}`);
    endpoint = JSON.parse(body);
    assert.match(endpoint.id, /^whe_/);
    assert.match(endpoint.secret, /^whsec_/);
    assert.deepEqual([...endpoint.events].sort(), ['task.cancelled', 'task.completed', 'task.failed']);
    process.env.HOOKLINE_WEBHOOK_SECRET = endpoint.secret;
  });

  it('photography answers at once with the task and its watch link', async () => {
    result = await callAs(OPENID, photography.main, {
      action: 'generate',
      requestId: `e2e-${process.pid}`,
      prompt: 'a portrait, watercolour',
      fileID: PHOTO,
    });
    assert.equal(result.error, undefined, JSON.stringify(result));
    assert.match(result.task_id, /^tsk_/);
    assert.equal(
      typeof result.watch_url,
      'string',
      `no watch_url in hookline's 202: ${JSON.stringify(result)}`,
    );
    const [work] = cb.db.records('works');
    assert.equal(work.task_id, result.task_id);
  });

  it("hookline's webhook completes the works and task_queue records with the result image", async () => {
    assert.ok(endpoint && result && result.task_id, 'needs the registration and the task above');
    const work = await waitFor(
      () => {
        const [w] = cb.db.records('works');
        return w && ['completed', 'failed', 'cancelled'].includes(w.status) ? w : null;
      },
      () =>
        `works never finished: ${JSON.stringify(cb.db.records('works'))}; deliveries ${JSON.stringify(access.exchanges.map((e) => [e.statusCode, e.reply]))}`,
    );
    assert.equal(work.status, 'completed', JSON.stringify(work));
    assert.equal(work.images.length, 1);
    assert.equal(work.error, null);
    const task = await (await fetch(`${base}/v1/tasks/${result.task_id}`, { headers: auth })).json();
    assert.equal(task.state, 'completed');
    assert.equal(new URL(work.images[0]).pathname, new URL(task.outputs[0].url).pathname);
    const picture = await fetch(work.images[0]);
    assert.equal(picture.status, 200);
    assert.match(picture.headers.get('content-type'), /^image\//);
    const [queued] = cb.db.records('task_queue');
    assert.equal(queued._id, result.task_id);
    assert.equal(queued.status, 'completed');
    assert.ok(
      cb.db
        .records('hookline_deliveries')
        .some((d) => d.task_id === result.task_id && d.type === 'task.completed'),
    );
  });

  it('a replayed delivery (the same bytes and headers again) changes nothing', async () => {
    const applied = access.exchanges.find(
      (e) => e.reply.status === 'applied' && JSON.parse(e.raw).data?.id === result?.task_id,
    );
    assert.ok(
      applied,
      `no applied delivery for the task: ${JSON.stringify(access.exchanges.map((e) => e.reply))}`,
    );
    const before = cb.db.snapshot();
    const replay = await post(`${access.url}/hookline-webhook`, applied.headers, applied.raw);
    assert.equal(replay.status, 200);
    assert.deepEqual(replay.body, { status: 'duplicate' });
    assert.deepEqual(cb.db.snapshot(), before);
  });

  it('a forged delivery is refused with 401 and changes nothing', async () => {
    const applied = access.exchanges.find((e) => e.reply.status === 'applied');
    assert.ok(applied, 'needs a delivery above');
    const before = cb.db.snapshot();
    const forged = Buffer.from(applied.raw.toString().replace('"completed"', '"failed"'));
    const headers = { ...applied.headers, 'webhook-id': `${applied.headers['webhook-id']}-forged` };
    const reply = await post(`${access.url}/hookline-webhook`, headers, forged);
    assert.equal(reply.status, 401);
    assert.deepEqual(cb.db.snapshot(), before);
  });

  it('the watch link answers without the API key', async () => {
    assert.ok(result && typeof result.watch_url === 'string', 'needs the watch_url above');
    const controller = new AbortController();
    const response = await fetch(result.watch_url, { signal: controller.signal });
    controller.abort(); // it may be a stream: its status is what is checked
    assert.equal(response.status, 200);
  });
});

async function post(url, headers, body) {
  const forwarded = Object.fromEntries(
    Object.entries(headers).filter(([name]) => !['host', 'content-length', 'connection'].includes(name)),
  );
  const response = await fetch(url, { method: 'POST', headers: forwarded, body });
  return { status: response.status, body: await response.json() };
}

/** Poll `probe` until it gives a value, for at most WAIT_MS. */
async function waitFor(probe, explain) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const value = await probe();
    if (value) return value;
    assert.ok(Date.now() < deadline, explain());
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
