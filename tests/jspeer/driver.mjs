// matrix-js-sdk with its Rust crypto (Element's engine), driven by olmstead's tests.
//
// Commands arrive on stdin, one JSON object a line: {"id": 1, "cmd": "login", ...}.
// Answers go to stdout, one JSON object a line: {"id": 1, "ok": true, "result": ...}
// or {"id": 1, "ok": false, "error": "..."}. What the client sees on its own is
// reported as {"event": "..."} lines: "message" (a decrypted room event, with the
// js-sdk's shield for its sender), "undecryptable" (with the js-sdk's failure code,
// e.g. MEGOLM_KEY_WITHHELD_FOR_UNVERIFIED_DEVICE), "to_device" (cleartext and
// decrypted to-device events, m.room_key.withheld among them).
//
// The js-sdk's own logging goes to stderr: stdout carries only the protocol.

import "fake-indexeddb/auto";
import { createInterface } from "node:readline";
import { format } from "node:util";

for (const level of ["log", "info", "debug", "warn", "error", "trace"]) {
    console[level] = (...args) => process.stderr.write(format(...args) + "\n");
}

const sdk = await import("matrix-js-sdk");
const cryptoApi = await import("matrix-js-sdk/lib/crypto-api/index.js");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
logger.setLevel(process.env.JSPEER_LOG_LEVEL ?? "warn");

let client = null;
let password = null;

function emit(line) {
    process.stdout.write(JSON.stringify(line) + "\n");
}

function crypto() {
    const api = client?.getCrypto();
    if (!api) throw new Error("not logged in: send login first");
    return api;
}

function uiaAuth(makeRequest) {
    // the first upload of cross-signing keys needs no auth (spec v1.11); a reset does
    return makeRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: client.getUserId() },
        password,
    });
}

async function reportEvent(event) {
    if (event.isDecryptionFailure()) {
        emit({
            event: "undecryptable",
            room_id: event.getRoomId(),
            event_id: event.getId(),
            sender: event.getSender(),
            code: event.decryptionFailureReason,
        });
        return;
    }
    if (!event.isEncrypted()) return;
    const info = await client.getCrypto().getEncryptionInfoForEvent(event);
    emit({
        event: "message",
        room_id: event.getRoomId(),
        event_id: event.getId(),
        sender: event.getSender(),
        type: event.getType(),
        content: event.getContent(),
        shield_colour: info?.shieldColour ?? null,
        shield_reason: info?.shieldReason ?? null,
    });
}

const commands = {
    async login({ base_url, user_id, password: secret, device_name }) {
        password = secret;
        const bare = sdk.createClient({ baseUrl: base_url });
        const answer = await bare.loginRequest({
            type: "m.login.password",
            identifier: { type: "m.id.user", user: user_id },
            password: secret,
            initial_device_display_name: device_name ?? "js-sdk",
        });
        client = sdk.createClient({
            baseUrl: base_url,
            userId: answer.user_id,
            deviceId: answer.device_id,
            accessToken: answer.access_token,
        });
        await client.initRustCrypto();
        client.on(sdk.MatrixEventEvent.Decrypted, (event) => {
            reportEvent(event).catch((e) => console.error("report failed", e));
        });
        client.on(sdk.ClientEvent.ToDeviceEvent, (event) => {
            emit({
                event: "to_device",
                type: event.getType(),
                sender: event.getSender(),
                content: event.getContent(),
            });
        });
        const prepared = new Promise((resolve) => {
            client.on(sdk.ClientEvent.Sync, (state) => {
                if (state === "PREPARED" || state === "SYNCING") resolve();
            });
        });
        await client.startClient({ initialSyncLimit: 20 });
        await prepared;
        // others can share with this device only once its keys are on the server
        const deadline = Date.now() + 20000;
        for (;;) {
            const keys = await client.http.authedRequest("POST", "/keys/query", undefined, {
                device_keys: { [answer.user_id]: [answer.device_id] },
            });
            if (keys.device_keys?.[answer.user_id]?.[answer.device_id]) break;
            if (Date.now() > deadline) throw new Error("the js-sdk never uploaded its device keys");
            await new Promise((r) => setTimeout(r, 100));
        }
        return { user_id: answer.user_id, device_id: answer.device_id };
    },

    async bootstrap_cross_signing() {
        await crypto().bootstrapCrossSigning({ authUploadDeviceSigningKeys: uiaAuth });
        return await commands.own_identity();
    },

    async reset_identity() {
        await crypto().bootstrapCrossSigning({
            setupNewCrossSigning: true,
            authUploadDeviceSigningKeys: uiaAuth,
        });
        return await commands.own_identity();
    },

    async own_identity() {
        const keys = await crypto().getOwnDeviceKeys();
        return {
            master_key: await crypto().getCrossSigningKeyId(),
            ready: await crypto().isCrossSigningReady(),
            ed25519: keys.ed25519,
            curve25519: keys.curve25519,
        };
    },

    async set_isolation({ mode }) {
        const chosen =
            mode === "only_signed"
                ? new cryptoApi.OnlySignedDevicesIsolationMode()
                : new cryptoApi.AllDevicesIsolationMode(false);
        crypto().setDeviceIsolationMode(chosen);
        return mode;
    },

    async create_room({ invite }) {
        const answer = await client.createRoom({
            invite: invite ?? [],
            preset: "private_chat",
            initial_state: [
                {
                    type: "m.room.encryption",
                    state_key: "",
                    content: { algorithm: "m.megolm.v1.aes-sha2" },
                },
            ],
        });
        return answer.room_id;
    },

    async join({ room_id }) {
        await client.joinRoom(room_id);
        return room_id;
    },

    async wait_joined({ room_id, user_id, timeout_ms }) {
        // the js-sdk shares keys only with members it has seen join
        const deadline = Date.now() + (timeout_ms ?? 20000);
        while (Date.now() < deadline) {
            const member = client.getRoom(room_id)?.getMember(user_id);
            if (member?.membership === "join") return true;
            await new Promise((r) => setTimeout(r, 100));
        }
        throw new Error(`${user_id} did not appear joined in ${room_id}`);
    },

    async send({ room_id, body, timeout_ms }) {
        // the js-sdk encrypts only once its sync has shown it the room's encryption state
        const deadline = Date.now() + (timeout_ms ?? 20000);
        while (!(await crypto().isEncryptionEnabledInRoom(room_id))) {
            if (Date.now() > deadline) throw new Error(`${room_id} never showed as encrypted`);
            await new Promise((r) => setTimeout(r, 100));
        }
        const answer = await client.sendTextMessage(room_id, body);
        return answer.event_id;
    },

    async device_trust({ user_id, device_id }) {
        // how the js-sdk sees a device (olmstead's, for instance): refreshed from the server
        await crypto().getUserDeviceInfo([user_id], true);
        const status = await crypto().getDeviceVerificationStatus(user_id, device_id);
        const user = await crypto().getUserVerificationStatus(user_id);
        return {
            known: status !== null,
            signed_by_owner: status?.signedByOwner ?? false,
            cross_signing_verified: status?.crossSigningVerified ?? false,
            user_cross_signing_verified: user.isCrossSigningVerified(),
            user_needs_approval: user.needsUserApproval,
        };
    },

    async stop() {
        client?.stopClient();
        setTimeout(() => process.exit(0), 50);
        return true;
    },
};

const lines = createInterface({ input: process.stdin });
lines.on("line", async (line) => {
    let request;
    try {
        request = JSON.parse(line);
    } catch {
        emit({ id: null, ok: false, error: `not JSON: ${line}` });
        return;
    }
    const { id, cmd, ...args } = request;
    try {
        const run = commands[cmd];
        if (!run) throw new Error(`unknown command ${cmd}`);
        emit({ id, ok: true, result: (await run(args)) ?? null });
    } catch (error) {
        emit({ id, ok: false, error: String(error?.stack ?? error) });
    }
});
lines.on("close", () => {
    client?.stopClient();
    process.exit(0);
});
