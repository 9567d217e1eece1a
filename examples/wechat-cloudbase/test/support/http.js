/**
 * Real HTTP peers on loopback for the tests: a scripted stand-in for hookline's task API, and a
 * receiver that turns requests into CloudBase HTTP-access events for a function.
 */

'use strict';

const http = require('node:http');

/** Listen on a free loopback port; resolves to `{server, url}`. */
async function listen(handler) {
  const server = http.createServer(handler);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, url: `http://127.0.0.1:${server.address().port}` };
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks);
}

/**
 * A scripted hookline: `answer(request)` gives `{status, json}` (or `{status, text}`, or
 * `{hang: true}` to never answer); every request is kept in `requests` with its parsed body.
 */
async function scriptedHookline(answer) {
  const requests = [];
  const { server, url } = await listen(async (req, res) => {
    const raw = await readBody(req);
    const request = {
      method: req.method,
      path: req.url,
      headers: req.headers,
      body: JSON.parse(raw.toString() || 'null'),
    };
    requests.push(request);
    const reply = answer(request);
    if (reply.hang) return; // closed when the server closes
    res.writeHead(reply.status, { 'content-type': reply.json ? 'application/json' : 'text/plain' });
    res.end(reply.json ? JSON.stringify(reply.json) : reply.text || '');
  });
  return {
    url,
    requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(resolve);
      }),
  };
}

/**
 * CloudBase HTTP access in front of `main`: each request becomes `{httpMethod, path, headers,
 * queryStringParameters, body, isBase64Encoded}` (the body base64-encoded, as CloudBase passes
 * bodies it does not treat as text), and `main`'s `{statusCode, headers, body}` is the answer.
 * Every exchange is kept in `exchanges` (`raw` body, request `headers`, `statusCode`, `reply`).
 * `extra(req, res)` may answer other paths first (return true when it did).
 */
async function cloudbaseHttpAccess(main, extra = () => false) {
  const exchanges = [];
  const { server, url } = await listen(async (req, res) => {
    if (extra(req, res)) return;
    const raw = await readBody(req);
    const event = {
      httpMethod: req.method,
      path: new URL(req.url, 'http://x').pathname,
      headers: { ...req.headers },
      queryStringParameters: {},
      requestContext: { appId: '', envId: 'test-env' },
      body: raw.toString('base64'),
      isBase64Encoded: true,
    };
    const result = await main(event, {});
    exchanges.push({
      raw,
      headers: req.headers,
      statusCode: result.statusCode,
      reply: JSON.parse(result.body),
    });
    res.writeHead(result.statusCode, result.headers || {});
    res.end(result.isBase64Encoded ? Buffer.from(result.body, 'base64') : result.body);
  });
  return {
    url,
    exchanges,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(resolve);
      }),
  };
}

module.exports = { cloudbaseHttpAccess, listen, readBody, scriptedHookline };
