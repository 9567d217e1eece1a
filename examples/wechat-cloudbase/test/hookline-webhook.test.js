/**
 * hooklineWebhook on CloudBase HTTP-access events: a signed delivery updates `works` and
 * `task_queue` once; a forged, expired or malformed one is refused and changes nothing; a
 * duplicate, a stale or an early delivery changes nothing either.
 */

'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { afterEach, beforeEach, describe, it } = require('node:test');
const { Webhook } = require('standardwebhooks');
const cloud = require('wx-server-sdk');
const webhook = require('../cloudfunctions/hooklineWebhook');
const { installCloudBase } = require('./support/cloudbase');

const SECRET = `whsec_${crypto.randomBytes(24).toString('base64')}`;
const OTHER_SECRET = `whsec_${crypto.randomBytes(24).toString('base64')}`;
const OUTPUT = 'http://127.0.0.1:8000/files/outputs/tsk_1/0.jpeg?exp=1&sig=s';

let cb;
let counter = 0;

function task(fields = {}) {
  return {
    id: 'tsk_1',
    state: 'completed',
    attempts: 1,
    updated_at: '2025-01-01T00:00:10.5Z',
    outputs: [{ url: OUTPUT, width: 64, height: 48, content_type: 'image/jpeg' }],
    error: null,
    ...fields,
  };
}

/** A CloudBase HTTP event carrying a delivery signed as hookline signs it. */
function delivery(data, options = {}) {
  const {
    type = `task.${data.state}`,
    id = `msg_${++counter}`,
    at = new Date(),
    secret = SECRET,
    base64 = false,
    headerCase = (name) => name,
    body = JSON.stringify({ type, created_at: at.toISOString(), data }),
  } = options;
  const signature = new Webhook(secret).sign(id, at, body);
  return {
    httpMethod: 'POST',
    path: '/hookline-webhook',
    headers: {
      [headerCase('webhook-id')]: id,
      [headerCase('webhook-timestamp')]: String(Math.floor(at.getTime() / 1000)),
      [headerCase('webhook-signature')]: signature,
      [headerCase('content-type')]: 'application/json',
    },
    queryStringParameters: {},
    body: base64 ? Buffer.from(body).toString('base64') : body,
    isBase64Encoded: base64,
  };
}

async function receive(event) {
  const result = await webhook.main(event, {});
  return { statusCode: result.statusCode, body: JSON.parse(result.body), headers: result.headers };
}

beforeEach(async () => {
  cb = installCloudBase(cloud);
  process.env.HOOKLINE_WEBHOOK_SECRET = SECRET;
  const now = cb.db.serverDate();
  await cb.db.collection('works').add({
    data: {
      _id: 'w_1',
      _openid: 'oAlice',
      prompt: 'p',
      status: 'pending',
      task_id: 'tsk_1',
      images: [],
      error: null,
      created_at: now,
      updated_at: now,
    },
  });
  await cb.db.collection('task_queue').add({
    data: {
      _id: 'tsk_1',
      _openid: 'oAlice',
      work_id: 'w_1',
      status: 'pending',
      attempts: 0,
      error: null,
      created_at: now,
      updated_at: now,
    },
  });
});

afterEach(() => cb.restore());

describe('hooklineWebhook applies a signed delivery', () => {
  it('completes the works and task_queue records with the result URLs', async () => {
    const reply = await receive(delivery(task(), { id: 'msg_done' }));
    assert.equal(reply.statusCode, 200);
    assert.deepEqual(reply.body, { status: 'applied' });
    const [work] = cb.db.records('works');
    assert.equal(work.status, 'completed');
    assert.deepEqual(work.images, [OUTPUT]);
    assert.equal(work.error, null);
    assert.equal(work.task_updated_at, '2025-01-01T00:00:10.5Z');
    assert.equal(work.prompt, 'p'); // the rest of the record stands
    const [queued] = cb.db.records('task_queue');
    assert.equal(queued.status, 'completed');
    assert.equal(queued.attempts, 1);
    const [seen] = cb.db.records('hookline_deliveries');
    assert.equal(seen._id, 'msg_done');
    assert.equal(seen.task_id, 'tsk_1');
    assert.equal(seen.work_id, 'w_1');
  });

  it('records a failure with its error and no images', async () => {
    const failed = task({
      state: 'failed',
      outputs: [],
      error: { code: 'provider_failed', message: 'NSFW input' },
    });
    assert.equal((await receive(delivery(failed))).statusCode, 200);
    const [work] = cb.db.records('works');
    assert.equal(work.status, 'failed');
    assert.deepEqual(work.error, { code: 'provider_failed', message: 'NSFW input' });
    assert.deepEqual(work.images, []);
    assert.deepEqual(cb.db.records('task_queue')[0].error, {
      code: 'provider_failed',
      message: 'NSFW input',
    });
  });

  it('takes a base64 body (isBase64Encoded) and header names in any case', async () => {
    const event = delivery(task(), {
      base64: true,
      headerCase: (n) => n.replace(/(^|-)\w/g, (c) => c.toUpperCase()),
    });
    assert.ok('Webhook-Signature' in event.headers);
    assert.equal((await receive(event)).statusCode, 200);
    assert.equal(cb.db.records('works')[0].status, 'completed');
  });

  it('follows non-terminal states and never moves a record back', async () => {
    const processing = task({ state: 'processing', outputs: [], updated_at: '2025-01-01T00:00:01Z' });
    const aiProcessing = task({ state: 'ai_processing', outputs: [], updated_at: '2025-01-01T00:00:02Z' });
    assert.deepEqual((await receive(delivery(aiProcessing))).body, { status: 'applied' });
    assert.deepEqual((await receive(delivery(processing))).body, { status: 'stale' }); // late retry
    assert.equal(cb.db.records('works')[0].status, 'ai_processing');
    assert.deepEqual((await receive(delivery(task()))).body, { status: 'applied' });
    const late = task({ state: 'watermarking', outputs: [], updated_at: '2025-01-01T00:00:20Z' });
    assert.deepEqual((await receive(delivery(late))).body, { status: 'stale' }); // completed is final
    assert.equal(cb.db.records('works')[0].status, 'completed');
    assert.equal(cb.db.records('task_queue')[0].status, 'completed');
  });

  it('acknowledges and records an event type it does not act on', async () => {
    const event = delivery(task(), { type: 'endpoint.test' });
    const before = cb.db.records('works');
    assert.deepEqual((await receive(event)).body, { status: 'ignored' });
    assert.deepEqual(cb.db.records('works'), before);
    assert.equal(cb.db.records('hookline_deliveries')[0].type, 'endpoint.test');
  });

  it('recreates a missing task_queue record', async () => {
    await cb.db.collection('task_queue').doc('tsk_1').remove();
    await receive(delivery(task()));
    const [queued] = cb.db.records('task_queue');
    assert.equal(queued._id, 'tsk_1');
    assert.equal(queued.work_id, 'w_1');
    assert.equal(queued.status, 'completed');
  });
});

describe('hooklineWebhook applies a delivery once', () => {
  it('answers a retry of a delivery (same webhook-id, new signature) as duplicate, changing nothing', async () => {
    await receive(delivery(task(), { id: 'msg_once' }));
    const before = cb.db.snapshot();
    const retry = delivery(task({ state: 'failed', error: { code: 'x', message: 'y' } }), {
      id: 'msg_once',
      at: new Date(Date.now() + 1000),
    });
    const reply = await receive(retry);
    assert.equal(reply.statusCode, 200);
    assert.deepEqual(reply.body, { status: 'duplicate' });
    assert.deepEqual(cb.db.snapshot(), before);
  });

  it('answers 404 for a task it has no record of yet, so that hookline retries, and applies the retry', async () => {
    await cb.db
      .collection('works')
      .doc('w_1')
      .update({ data: { task_id: null } });
    const event = delivery(task(), { id: 'msg_early' });
    const before = cb.db.snapshot();
    const reply = await receive(event);
    assert.equal(reply.statusCode, 404);
    assert.equal(reply.body.error.code, 'unknown_task');
    assert.deepEqual(cb.db.snapshot(), before);
    await cb.db
      .collection('works')
      .doc('w_1')
      .update({ data: { task_id: 'tsk_1' } }); // photography caught up
    assert.deepEqual((await receive(event)).body, { status: 'applied' });
    assert.equal(cb.db.records('works')[0].status, 'completed');
  });
});

describe('hooklineWebhook refuses what hookline did not send, changing nothing', () => {
  const forged = {
    'signed with another secret': () => delivery(task(), { secret: OTHER_SECRET }),
    'a body changed after signing': () => {
      const event = delivery(task());
      event.body = event.body.replace('completed', 'failed');
      return event;
    },
    'a signature for another webhook-id': () => {
      const event = delivery(task());
      event.headers['webhook-id'] = 'msg_other';
      return event;
    },
    'no webhook-signature header': () => {
      const event = delivery(task());
      delete event.headers['webhook-signature'];
      return event;
    },
    'no headers at all': () => ({ ...delivery(task()), headers: undefined }),
    'a timestamp six minutes old (a replay)': () =>
      delivery(task(), { at: new Date(Date.now() - 6 * 60 * 1000) }),
    'a timestamp six minutes ahead': () => delivery(task(), { at: new Date(Date.now() + 6 * 60 * 1000) }),
    'a timestamp that is no number': () => {
      const event = delivery(task());
      event.headers['webhook-timestamp'] = 'soon';
      return event;
    },
    'a base64 body passed as text': () => ({ ...delivery(task(), { base64: true }), isBase64Encoded: false }),
  };
  for (const [what, make] of Object.entries(forged)) {
    it(`answers 401 to ${what}`, async () => {
      const before = cb.db.snapshot();
      const reply = await receive(make());
      assert.equal(reply.statusCode, 401);
      assert.equal(reply.body.error.code, 'bad_signature');
      assert.deepEqual(cb.db.snapshot(), before);
    });
  }

  const malformed = {
    'a signed body that is not JSON': [delivery(task(), { body: 'not json' }), 400, 'malformed_body'],
    'a signed task event without a task': [
      delivery(task(), { body: JSON.stringify({ type: 'task.completed', data: null }) }),
      400,
      'malformed_body',
    ],
    'a signed task event whose task has no state': [
      delivery(task(), { body: JSON.stringify({ type: 'task.completed', data: { id: 'tsk_1' } }) }),
      400,
      'malformed_body',
    ],
    'a body that is not a string': [
      { ...delivery(task()), body: { type: 'task.completed' } },
      400,
      'bad_body',
    ],
    'a body over 1 MiB': [delivery(task(), { body: 'x'.repeat(1024 * 1024 + 1) }), 413, 'payload_too_large'],
    'a GET': [{ ...delivery(task()), httpMethod: 'GET' }, 405, 'method_not_allowed'],
  };
  for (const [what, [event, status, code]] of Object.entries(malformed)) {
    it(`answers ${status} ${code} to ${what}`, async () => {
      const before = cb.db.snapshot();
      const reply = await receive(event);
      assert.equal(reply.statusCode, status);
      assert.equal(reply.body.error.code, code);
      assert.deepEqual(cb.db.snapshot(), before);
    });
  }

  it('answers 500 not_configured without a secret, so that hookline retries once it is set', async () => {
    for (const secret of [undefined, '', 'not-a-whsec-secret']) {
      if (secret === undefined) delete process.env.HOOKLINE_WEBHOOK_SECRET;
      else process.env.HOOKLINE_WEBHOOK_SECRET = secret;
      const before = cb.db.snapshot();
      const reply = await receive(delivery(task()));
      assert.equal(reply.statusCode, 500);
      assert.equal(reply.body.error.code, 'not_configured');
      assert.deepEqual(cb.db.snapshot(), before);
    }
  });
});
