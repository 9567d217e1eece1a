/**
 * photography against a live hookline (HOOKLINE_URL, HOOKLINE_API_KEY; skipped without them):
 * the task is really created from the photo's URL, a retry of the same submit is hookline's
 * Idempotency-Key replay and is charged once, and hookline's refusals come back with its codes.
 * tests/integration/test_cloudbase_example.py starts the hookline and runs these.
 */

'use strict';

const assert = require('node:assert/strict');
const { after, before, beforeEach, afterEach, describe, it } = require('node:test');
const cloud = require('wx-server-sdk');
const photography = require('../cloudfunctions/photography');
const { callAs, installCloudBase, png } = require('./support/cloudbase');
const { listen } = require('./support/http');

const LIVE = process.env.HOOKLINE_URL && process.env.HOOKLINE_API_KEY;
const skip = LIVE ? false : 'needs a live hookline: HOOKLINE_URL and HOOKLINE_API_KEY';
const OPENID = 'oLive_0123456789abcdefghijk';
const PHOTO = `cloud://test-env.7465-test-env/photos/${OPENID}/portrait.png`;
let runs = 0;

describe('photography on a live hookline', { skip }, () => {
  let photos;
  let cb;
  const base = (process.env.HOOKLINE_URL || '').replace(/\/+$/, '');
  const key = process.env.HOOKLINE_API_KEY;

  async function api(path, init = {}) {
    const response = await fetch(`${base}${path}`, {
      ...init,
      headers: { authorization: `Bearer ${key}`, ...init.headers },
    });
    return { status: response.status, body: await response.json() };
  }

  function generate(fields = {}) {
    return callAs(OPENID, photography.main, {
      action: 'generate',
      requestId: `live-${process.pid}-${runs}`,
      prompt: 'a portrait in ink',
      fileID: PHOTO,
      ...fields,
    });
  }

  before(async () => {
    const image = png(64, 48);
    photos = await listen((req, res) => {
      res.writeHead(200, { 'content-type': 'image/png', 'content-length': image.length });
      res.end(image);
    });
  });

  after(() => new Promise((resolve) => photos.server.close(resolve)));

  beforeEach(() => {
    runs += 1;
    cb = installCloudBase(cloud);
    cb.files.set(PHOTO, `${photos.url}/photos/portrait.png`);
    process.env.HOOKLINE_API_KEY = key;
  });

  afterEach(() => cb.restore());

  it('creates a task hookline accepted, and stores its id on the works record', async () => {
    const result = await generate();
    assert.equal(result.error, undefined, JSON.stringify(result));
    assert.match(result.task_id, /^tsk_/);
    const task = await api(`/v1/tasks/${result.task_id}`);
    assert.equal(task.status, 200);
    assert.equal(task.body.prompt, 'a portrait in ink');
    const [work] = cb.db.records('works');
    assert.equal(work.task_id, result.task_id);
    assert.equal(cb.db.records('task_queue')[0]._id, result.task_id);
  });

  it("charges a retried submit once: the retry is hookline's Idempotency-Key replay", async () => {
    const start = (await api('/v1/me')).body.balance;
    const first = await generate();
    const charged = (await api('/v1/me')).body.balance;
    assert.ok(charged < start, `a task costs something (${start} → ${charged})`);
    // The function died before it stored the task id: the retry must ask hookline again.
    await cb.db
      .collection('works')
      .doc(first.work_id)
      .update({ data: { task_id: null } });
    const retry = await generate();
    assert.equal(retry.task_id, first.task_id);
    assert.equal((await api('/v1/me')).body.balance, charged);
  });

  it("returns hookline's refusal with its code and status, leaving no works record", async () => {
    const result = await generate({ style: 'no-such-style' });
    assert.equal(result.error.status, 422, JSON.stringify(result));
    assert.equal(result.error.retryable, false);
    assert.ok(result.error.code && result.error.message);
    assert.deepEqual(cb.db.records('works'), []);
  });

  it("returns hookline's 401 for a wrong API key, leaving no works record", async () => {
    process.env.HOOKLINE_API_KEY = 'hl_not_a_key';
    const result = await generate();
    assert.equal(result.error.status, 401, JSON.stringify(result));
    assert.equal(result.error.retryable, false);
    assert.ok(result.error.code && result.error.message);
    assert.deepEqual(cb.db.records('works'), []);
  });

  it("returns the task's watch_url, a link hookline signed", async () => {
    const result = await generate();
    assert.equal(
      typeof result.watch_url,
      'string',
      `hookline's 202 has no watch_url: ${JSON.stringify(result)}`,
    );
    assert.ok(result.watch_url.startsWith('http'), result.watch_url);
    assert.equal(cb.db.records('works')[0].watch_url, result.watch_url);
  });
});
