/**
 * photography against a scripted hookline on loopback: bad requests are refused before anything
 * is written or sent; a good one writes `works` and `task_queue` and answers at once; a retry of
 * the same submit is the same task; a refusal by hookline leaves no record behind.
 */

'use strict';

const assert = require('node:assert/strict');
const { afterEach, beforeEach, describe, it } = require('node:test');
const cloud = require('wx-server-sdk');
const photography = require('../cloudfunctions/photography');
const { callAs, installCloudBase } = require('./support/cloudbase');
const { listen, scriptedHookline } = require('./support/http');

const ALICE = 'oAlice_0123456789abcdefghij';
const BOB = 'oBob_0123456789abcdefghijkl';
const PHOTO = `cloud://test-env.7465-test-env/photos/${ALICE}/1700000000.jpg`;
const TEMP_URL = 'https://7465-test-env.tcb.qcloud.la/photos/a.jpg?sign=first&t=1';

let cb;
let hookline;
let answer;

function accepted(request) {
  const n = hookline.requests.length;
  return {
    status: 202,
    json: {
      id: `tsk_${n}`,
      state: 'pending',
      attempts: 0,
      watch_url: `http://hookline.test/watch/tsk_${n}?sig=x`,
    },
  };
}

function generate(fields, openid = ALICE) {
  return callAs(openid, photography.main, {
    action: 'generate',
    requestId: 'req-1',
    prompt: 'a portrait at dusk',
    fileID: PHOTO,
    ...fields,
  });
}

beforeEach(async () => {
  cb = installCloudBase(cloud);
  cb.files.set(PHOTO, TEMP_URL);
  answer = accepted;
  hookline = await scriptedHookline((request) => answer(request));
  process.env.HOOKLINE_URL = hookline.url;
  process.env.HOOKLINE_API_KEY = 'hl_test_key';
  delete process.env.HOOKLINE_TIMEOUT_MS;
  delete process.env.PHOTO_DIR;
});

afterEach(async () => {
  cb.restore();
  await hookline.close();
});

describe('photography refuses bad requests, writing and sending nothing', () => {
  const cases = [
    ['no requestId', { requestId: undefined }, 'bad_request_id'],
    ['a requestId with a slash', { requestId: 'a/b' }, 'bad_request_id'],
    ['a requestId of 65 characters', { requestId: 'r'.repeat(65) }, 'bad_request_id'],
    ['no prompt', { prompt: undefined }, 'bad_prompt'],
    ['a blank prompt', { prompt: ' \n\t' }, 'bad_prompt'],
    ['a prompt that is not a string', { prompt: ['a'] }, 'bad_prompt'],
    ['a prompt over 2000 characters', { prompt: 'p'.repeat(2001) }, 'prompt_too_long'],
    ['a style that is not a name', { style: 'anime; drop' }, 'bad_style'],
    ['a style that is a number', { style: 7 }, 'bad_style'],
    ['no image', { fileID: undefined }, 'bad_image'],
    ['both fileID and imageUrl', { imageUrl: 'https://example.com/a.jpg' }, 'bad_image'],
    ['a fileID that is not cloud://', { fileID: 'https://x/a.jpg' }, 'bad_image'],
    ["another user's fileID", { fileID: `cloud://test-env.7465-test-env/photos/${BOB}/1.jpg` }, 'bad_image'],
    [
      'a fileID climbing out of the folder',
      { fileID: `cloud://test-env.b/photos/${ALICE}/../${BOB}/1.jpg` },
      'bad_image',
    ],
    ['a fileID outside the photo folder', { fileID: `cloud://test-env.b/other/${ALICE}/1.jpg` }, 'bad_image'],
    [
      'a fileID cloud storage does not have',
      { fileID: `cloud://test-env.b/photos/${ALICE}/gone.jpg` },
      'image_not_found',
    ],
    ['an http imageUrl', { fileID: undefined, imageUrl: 'http://example.com/a.jpg' }, 'bad_image'],
    [
      'an imageUrl with credentials',
      { fileID: undefined, imageUrl: 'https://u:p@example.com/a.jpg' },
      'bad_image',
    ],
    ['an imageUrl that is no URL', { fileID: undefined, imageUrl: 'https://' }, 'bad_image'],
    ['an unknown action', { action: 'delete' }, 'unknown_action'],
  ];
  for (const [what, fields, code] of cases) {
    it(`refuses ${what} (${code})`, async () => {
      const result = await generate(fields);
      assert.equal(result.error.code, code, JSON.stringify(result));
      assert.equal(result.error.retryable, false);
      assert.ok(result.error.message.length > 0);
      assert.deepEqual(cb.db.snapshot().works || [], []);
      assert.deepEqual(cb.db.snapshot().task_queue || [], []);
      assert.equal(hookline.requests.length, 0);
    });
  }

  it('refuses a call without an OPENID (not from the mini-program)', async () => {
    const result = await photography.main(
      { action: 'generate', requestId: 'r', prompt: 'p', fileID: PHOTO },
      {},
    );
    assert.equal(result.error.code, 'no_openid');
    assert.equal(hookline.requests.length, 0);
  });

  it('says so when HOOKLINE_URL or HOOKLINE_API_KEY is missing', async () => {
    delete process.env.HOOKLINE_API_KEY;
    assert.equal((await generate({})).error.code, 'not_configured');
    process.env.HOOKLINE_API_KEY = 'k';
    process.env.HOOKLINE_URL = 'hookline.example';
    assert.equal((await generate({})).error.code, 'not_configured');
    assert.equal(hookline.requests.length, 0);
    assert.deepEqual(cb.db.records('works'), []);
  });
});

describe('photography creates the hookline task and returns at once', () => {
  it('writes a pending works record and task_queue record and answers {task_id, watch_url, work_id}', async () => {
    const result = await generate({ style: 'anime' });
    assert.deepEqual(Object.keys(result).sort(), ['task_id', 'watch_url', 'work_id']);
    assert.equal(result.task_id, 'tsk_1');
    assert.equal(result.watch_url, 'http://hookline.test/watch/tsk_1?sig=x');

    const [request] = hookline.requests;
    assert.equal(request.method, 'POST');
    assert.equal(request.path, '/v1/tasks');
    assert.equal(request.headers.authorization, 'Bearer hl_test_key');
    assert.match(request.headers['idempotency-key'], /^wx-photography-[0-9a-f]{64}$/);
    assert.deepEqual(request.body, {
      inputs: [{ url: TEMP_URL }],
      prompt: 'a portrait at dusk',
      num_outputs: 1,
      style: 'anime',
    });

    const [work] = cb.db.records('works');
    assert.equal(work._id, result.work_id);
    assert.equal(work._openid, ALICE);
    assert.equal(work.status, 'pending');
    assert.equal(work.task_id, 'tsk_1');
    assert.equal(work.watch_url, result.watch_url);
    assert.deepEqual(work.images, []);
    assert.equal(work.error, null);
    assert.equal(work.input_url, TEMP_URL);
    assert.ok(work.created_at instanceof Date);

    const [queued] = cb.db.records('task_queue');
    assert.equal(queued._id, 'tsk_1');
    assert.equal(queued.work_id, work._id);
    assert.equal(queued.status, 'pending');
  });

  it('sends no style when none is asked for, and takes an https imageUrl as it is', async () => {
    await generate({ fileID: undefined, imageUrl: 'https://img.example.com/me.jpg' });
    assert.deepEqual(hookline.requests[0].body, {
      inputs: [{ url: 'https://img.example.com/me.jpg' }],
      prompt: 'a portrait at dusk',
      num_outputs: 1,
    });
  });

  it('answers a retry of the same submit with the same task, without asking hookline again', async () => {
    const first = await generate({});
    const before = cb.db.snapshot();
    const again = await generate({});
    assert.deepEqual(again, first);
    assert.equal(hookline.requests.length, 1);
    assert.deepEqual(cb.db.snapshot(), before);
  });

  it('refuses the same requestId for another request (request_conflict) and changes nothing', async () => {
    await generate({});
    const before = cb.db.snapshot();
    const result = await generate({ prompt: 'something else' });
    assert.equal(result.error.code, 'request_conflict');
    assert.equal(hookline.requests.length, 1);
    assert.deepEqual(cb.db.snapshot(), before);
  });

  it('keys the record and the Idempotency-Key by user and requestId', async () => {
    const bobPhoto = `cloud://test-env.7465-test-env/photos/${BOB}/1.jpg`;
    cb.files.set(bobPhoto, 'https://7465-test-env.tcb.qcloud.la/b.jpg');
    const alice = await generate({});
    const bob = await generate({ fileID: bobPhoto }, BOB);
    const other = await generate({ requestId: 'req-2' });
    assert.equal(new Set([alice.work_id, bob.work_id, other.work_id]).size, 3);
    assert.equal(new Set(hookline.requests.map((r) => r.headers['idempotency-key'])).size, 3);
  });

  it('sends the stored photo URL when an interrupted submit is retried, so hookline replays it', async () => {
    // The function died after writing works and before storing the task: the record has no task_id.
    await generate({});
    const [work] = cb.db.records('works');
    await cb.db
      .collection('works')
      .doc(work._id)
      .update({ data: { task_id: null, watch_url: null } });
    await cb.db.collection('task_queue').doc('tsk_1').remove();
    cb.files.set(PHOTO, 'https://7465-test-env.tcb.qcloud.la/photos/a.jpg?sign=second&t=2');
    answer = () => ({
      status: 202,
      json: {
        id: 'tsk_1',
        state: 'processing',
        attempts: 1,
        watch_url: 'http://hookline.test/watch/tsk_1?sig=x',
      },
    });
    const result = await generate({});
    assert.equal(result.task_id, 'tsk_1');
    const [first, retry] = hookline.requests;
    assert.deepEqual(retry.body, first.body);
    assert.equal(retry.headers['idempotency-key'], first.headers['idempotency-key']);
    assert.equal(cb.db.records('works')[0].task_id, 'tsk_1');
    assert.equal(cb.db.records('task_queue')[0].status, 'processing');
  });
});

/** After a timeout or a 5xx hookline may have made the task: the record stays (no task id yet)
 * so that a retry with the same requestId finishes it under the same Idempotency-Key. */
function assertKeptForTheRetry() {
  const works = cb.db.records('works');
  assert.equal(works.length, 1);
  assert.equal(works[0].task_id ?? null, null);
}

describe("photography passes hookline's refusals on; a final one leaves no record", () => {
  it('relays a 402 as hookline says it, not retryable, and removes the works record', async () => {
    answer = () => ({
      status: 402,
      json: { error: { code: 'insufficient_credits', message: 'balance 0, the task costs 8' } },
    });
    const result = await generate({});
    assert.deepEqual(result, {
      error: {
        code: 'insufficient_credits',
        message: 'balance 0, the task costs 8',
        retryable: false,
        status: 402,
      },
    });
    assert.deepEqual(cb.db.records('works'), []);
    assert.deepEqual(cb.db.records('task_queue'), []);

    answer = accepted; // the operator topped up: the same submit goes through
    const retry = await generate({});
    assert.equal(retry.task_id, 'tsk_2');
    assert.equal(cb.db.records('works').length, 1);
    assert.equal(
      hookline.requests[0].headers['idempotency-key'],
      hookline.requests[1].headers['idempotency-key'],
    );
  });

  it('relays a 422 with its code', async () => {
    answer = () => ({
      status: 422,
      json: { error: { code: 'unknown_style', message: "unknown style 'x'", details: null } },
    });
    const result = await generate({ style: 'x' });
    assert.equal(result.error.code, 'unknown_style');
    assert.equal(result.error.status, 422);
    assert.deepEqual(cb.db.records('works'), []);
  });

  it('calls an answer that is not hookline JSON hookline_error, retryable on a 5xx', async () => {
    answer = () => ({ status: 502, text: '<html>bad gateway</html>' });
    const result = await generate({});
    assert.equal(result.error.code, 'hookline_error');
    assert.equal(result.error.retryable, true);
    assert.match(result.error.message, /502/);
    assertKeptForTheRetry();
  });

  it('says hookline_unreachable when nothing listens, retryable', async () => {
    const { server, url } = await listen(() => {});
    await new Promise((resolve) => server.close(resolve));
    process.env.HOOKLINE_URL = url;
    const result = await generate({});
    assert.equal(result.error.code, 'hookline_unreachable');
    assert.equal(result.error.retryable, true);
    assertKeptForTheRetry();
  });

  it('gives up after HOOKLINE_TIMEOUT_MS (hookline_timeout), retryable', async () => {
    answer = () => ({ hang: true });
    process.env.HOOKLINE_TIMEOUT_MS = '200';
    const result = await generate({});
    assert.equal(result.error.code, 'hookline_timeout');
    assert.equal(result.error.retryable, true);
    assertKeptForTheRetry();
  });
});
