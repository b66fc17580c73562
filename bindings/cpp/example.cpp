// End-to-end check of the C++ wrapper against a running feed simulator:
//   example ws://127.0.0.1:PORT [MESSAGE_COUNT]
// Subscribes to two channels, checks that each channel's payload "seq" strictly
// increases, makes a good and a failing request, changes the pool's size at run time
// (connections open and drain; a refused change names the problem and changes
// nothing), shows that an invalid config is rejected with a ConfigError naming
// the key, finds the admin port the system chose (health.listen on port 0) through
// health_addr() and reads GET /health there, and counts the requests in
// request_latency_json(), submits requests and collects their replies later (one
// unanswered at close() says so). Exits 0 on success, 1 with a message on the first
// failure.

#include "wirepool.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

class CheckFailed : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

void expect(bool condition, const std::string &what) {
    if (!condition) {
        throw CheckFailed(what);
    }
}

// Escapes a string for use inside a JSON string literal (the URL comes from argv).
std::string json_string(std::string_view text) {
    std::string out = "\"";
    for (const char c : text) {
        switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
            if (static_cast<unsigned char>(c) < 0x20) {
                static const char hex[] = "0123456789abcdef";
                out += "\\u00";
                out += hex[(static_cast<unsigned char>(c) >> 4) & 0xf];
                out += hex[static_cast<unsigned char>(c) & 0xf];
            } else {
                out += c;
            }
        }
    }
    out += '"';
    return out;
}

// The reply to `GET path` from an IPv4 "host:port" (the admin port on loopback), as
// the server sent it (status line, headers, body), read until it closes.
std::string http_get(const std::string &addr, const std::string &path) {
    const std::size_t colon = addr.rfind(':');
    expect(colon != std::string::npos, "an address like 127.0.0.1:9090: " + addr);
    sockaddr_in peer{};
    peer.sin_family = AF_INET;
    peer.sin_port = htons(static_cast<std::uint16_t>(std::stoul(addr.substr(colon + 1))));
    expect(inet_pton(AF_INET, addr.substr(0, colon).c_str(), &peer.sin_addr) == 1,
           "an IPv4 address: " + addr);
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    expect(fd >= 0, "a socket");
    timeval timeout{10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    std::string reply;
    if (connect(fd, reinterpret_cast<const sockaddr *>(&peer), sizeof peer) == 0) {
        const std::string request =
            "GET " + path + " HTTP/1.1\r\nHost: " + addr + "\r\nConnection: close\r\n\r\n";
        if (send(fd, request.data(), request.size(), 0) == static_cast<ssize_t>(request.size())) {
            char buffer[4096];
            ssize_t got = 0;
            while ((got = recv(fd, buffer, sizeof buffer, 0)) > 0) {
                reply.append(buffer, static_cast<std::size_t>(got));
            }
        }
    }
    close(fd);
    return reply;
}

// The value of `"seq":N` in a payload such as {"seq":1,"ts_ns":...}, if present.
std::optional<std::uint64_t> parse_seq(std::string_view payload) {
    constexpr std::string_view key = "\"seq\":";
    const std::size_t at = payload.find(key);
    if (at == std::string_view::npos) {
        return std::nullopt;
    }
    std::size_t i = at + key.size();
    while (i < payload.size() && payload[i] == ' ') {
        ++i;
    }
    std::uint64_t value = 0;
    const std::size_t digits_start = i;
    while (i < payload.size() && payload[i] >= '0' && payload[i] <= '9') {
        value = value * 10 + static_cast<std::uint64_t>(payload[i] - '0');
        ++i;
    }
    if (i == digits_start) {
        return std::nullopt;
    }
    return value;
}

std::string shorten(std::string_view text, std::size_t max = 120) {
    if (text.size() <= max) {
        return std::string(text);
    }
    return std::string(text.substr(0, max)) + "...";
}

// A config whose pool sizes contradict each other must be refused with ConfigError,
// and the message must say which key is wrong.
void check_bad_config_is_rejected(const std::string &url) {
    const std::string bad = "{\"servers\":[{\"url\":" + json_string(url) +
                            "}],\"pool\":{\"min_connections\":5,\"max_connections\":2}}";
    try {
        wirepool::Pool pool(bad);
    } catch (const wirepool::ConfigError &e) {
        const std::string message = e.what();
        expect(e.code() == wirepool::ErrorCode::Config,
               "ConfigError carries code " + std::to_string(e.raw_code()));
        expect(message.find("pool.min_connections") != std::string::npos,
               "ConfigError message names pool.min_connections, got: " + message);
        std::cout << "bad config rejected: " << message << "\n";
        return;
    }
    throw CheckFailed("a config with min_connections 5 > max_connections 2 was accepted");
}

// How many of the pool's connections are ready (counted in connections_json()).
std::size_t ready_connections(const wirepool::Pool &pool) {
    const std::string listed = pool.connections_json();
    std::size_t count = 0;
    for (std::size_t at = listed.find("\"ready\":true"); at != std::string::npos;
         at = listed.find("\"ready\":true", at + 1)) {
        ++count;
    }
    return count;
}

// Waits, one pool event at a time, until exactly `wanted` connections are listed and
// ready (a drained connection leaves the list once it closed).
void wait_for_ready_connections(const wirepool::Pool &pool, std::size_t wanted) {
    const auto deadline = std::chrono::steady_clock::now() + seconds(10);
    while (true) {
        const std::string listed = pool.connections_json();
        std::size_t ids = 0;
        for (std::size_t at = listed.find("\"id\":"); at != std::string::npos;
             at = listed.find("\"id\":", at + 1)) {
            ++ids;
        }
        if (ids == wanted && ready_connections(pool) == wanted) {
            return;
        }
        expect(std::chrono::steady_clock::now() < deadline,
               std::to_string(wanted) + " ready connections within 10 s: " + shorten(listed, 400));
        (void)pool.events_json(milliseconds(200));
    }
}

// Requests submitted without waiting: collected later in another order, each with its
// own reply; a short wait finds one still pending; a venue error is thrown by get().
// Returns one still unanswered, for the check after close().
wirepool::PendingRequest check_submit(const wirepool::Pool &pool) {
    wirepool::PendingRequest slow = pool.submit(R"({"op":"delay","ms":1000,"n":1})", seconds(10));
    wirepool::PendingRequest quick = pool.submit(R"({"n":2})", seconds(10));
    wirepool::PendingRequest failing = pool.submit(R"({"op":"fail"})", seconds(10));
    expect(slow.id() != 0 && slow.id() < quick.id(), "request ids in submission order");
    expect(!slow.wait(milliseconds(0)).has_value(), "a reply delayed 1 s is not there at once");
    const std::string quick_reply = quick.get();
    expect(quick_reply == R"({"echo":{"n":2}})", "the quick request's own reply: " + quick_reply);
    expect(quick.finished(), "a request whose reply was taken is finished");
    expect(quick.get() == quick_reply, "a later get() gives the same reply");
    const std::string slow_reply = slow.get();
    expect(slow_reply == R"({"echo":{"op":"delay","ms":1000,"n":1}})",
           "the slow request's own reply: " + slow_reply);
    try {
        const std::string reply = failing.get();
        throw CheckFailed("a submitted {\"op\":\"fail\"} returned instead of throwing: " + reply);
    } catch (const wirepool::RemoteError &e) {
        expect(e.payload().find("requested failure") != std::string::npos,
               "the venue's error payload: " + e.payload());
    }
    wirepool::PendingRequest moved = std::move(slow);
    try {
        (void)slow.wait(milliseconds(0));
        throw CheckFailed("a moved-from PendingRequest waited instead of throwing");
    } catch (const wirepool::Error &e) {
        expect(e.code() == wirepool::ErrorCode::NullArgument, "moved-from use is NullArgument");
    }
    std::cout << "submitted: quick " << quick_reply << ", slow " << shorten(slow_reply, 60) << "\n";
    return pool.submit(R"({"op":"ignore"})", seconds(30));
}

// Pool sizes change at run time: a larger min_connections opens connections, a
// smaller one drains them, and a refused change says why and changes nothing.
void check_reconfigure(const wirepool::Pool &pool) {
    const wirepool::Settings before = pool.settings();
    expect(before.min_connections == 2 && before.max_connections == 2 &&
               before.strategy == "round_robin",
           "settings read back as configured: " + pool.settings_json());

    wirepool::SettingsChange grow;
    grow.min_connections = 3;
    grow.max_connections = 3;
    pool.reconfigure(grow);
    const wirepool::Settings grown = pool.settings();
    expect(grown.min_connections == 3 && grown.max_connections == 3 &&
               grown.strategy == "round_robin",
           "only min and max changed: " + pool.settings_json());
    wait_for_ready_connections(pool, 3);

    wirepool::SettingsChange inverted;
    inverted.min_connections = 4;
    try {
        pool.reconfigure(inverted);
        throw CheckFailed("min_connections 4 above max_connections 3 was accepted");
    } catch (const wirepool::Error &e) {
        const std::string message = e.what();
        expect(e.code() == wirepool::ErrorCode::InvalidArgument,
               "a refused change is an invalid argument: " + message);
        expect(message.find("pool.min_connections: 4 is greater than pool.max_connections (3)") !=
                   std::string::npos,
               "the refusal says why: " + message);
        std::cout << "refused change: " << message << "\n";
    }
    try {
        pool.reconfigure_json(R"({"min_connections": 2, "max_conections": 3})");
        throw CheckFailed("an unknown key was accepted");
    } catch (const wirepool::Error &e) {
        expect(e.code() == wirepool::ErrorCode::InvalidArgument &&
                   std::string(e.what()).find("\"max_conections\"") != std::string::npos,
               std::string("the unknown key is named: ") + e.what());
    }
    const wirepool::Settings after = pool.settings();
    expect(after.min_connections == 3 && after.max_connections == 3,
           "refused changes changed nothing: " + pool.settings_json());

    wirepool::SettingsChange shrink;
    shrink.min_connections = 2;
    pool.reconfigure(shrink);
    wait_for_ready_connections(pool, 2);
    std::cout << "reconfigured: 2 -> 3 -> 2 connections, now " << pool.settings_json() << "\n";
}

// Two ready connections to one server: the pool turns healthy (health is reassessed on
// the pool thread, so read it after each batch of events) and the server's breaker is
// closed with both connections ready.
void check_health_and_servers(const wirepool::Pool &pool) {
    const auto deadline = std::chrono::steady_clock::now() + seconds(10);
    std::string health = pool.health_json();
    while (health.find("\"level\":\"healthy\"") == std::string::npos) {
        expect(std::chrono::steady_clock::now() < deadline,
               "healthy within 10 s with two ready connections: " + shorten(health, 400));
        (void)pool.events_json(milliseconds(200));
        health = pool.health_json();
    }
    expect(health.find("\"reasons\":[]") != std::string::npos,
           "a healthy pool gives no reasons: " + shorten(health, 400));
    const std::string servers = pool.servers_json();
    expect(servers.find("\"circuit\":\"closed\"") != std::string::npos &&
               servers.find("\"ready_connections\":2") != std::string::npos,
           "the one server's breaker is closed with two ready connections: " + servers);
    std::cout << "health: healthy; servers: " << servers << "\n";
}

int run(const std::string &url, std::size_t wanted) {
    std::cout << "wirepool " << wirepool::version() << ", server " << url << "\n";

    check_bad_config_is_rejected(url);

    const std::string config = "{\"servers\":[{\"url\":" + json_string(url) +
                               "}],\"pool\":{\"min_connections\":2,\"max_connections\":2}," +
                               "\"health\":{\"listen\":\"127.0.0.1:0\"}}";
    wirepool::Pool pool(config);
    pool.wait_ready(seconds(10));
    const std::optional<std::string> admin = pool.health_addr();
    expect(admin.has_value() && admin->rfind("127.0.0.1:", 0) == 0 &&
               admin->substr(admin->rfind(':') + 1) != "0",
           "health_addr() names the port the system chose: " + admin.value_or("(none)"));
    const std::string health_reply = http_get(*admin, "/health");
    expect(health_reply.rfind("HTTP/1.1 200", 0) == 0 || health_reply.rfind("HTTP/1.1 503", 0) == 0,
           "GET /health answers at " + *admin + ": " + shorten(health_reply));
    std::cout << "admin port at " << *admin << "\n";
    {
        wirepool::Pool without_port("{\"servers\":[{\"url\":" + json_string(url) +
                                    "}],\"pool\":{\"min_connections\":1,\"max_connections\":1}}");
        expect(!without_port.health_addr().has_value(),
               "a pool without health.listen has no admin port");
    }
    expect(pool.fd() >= 0, "pool fd is a valid descriptor");
    check_health_and_servers(pool);

    const std::string channels[] = {"ticker.0", "ticker.1"};
    for (const std::string &channel : channels) {
        pool.subscribe(channel);
    }

    std::map<std::string, std::uint64_t, std::less<>> last_seq;
    std::map<std::string, std::size_t, std::less<>> per_channel;
    std::map<std::uint64_t, std::size_t> per_connection;
    std::size_t received = 0;
    std::size_t polls = 0;
    std::uint64_t first_received_ns = 0;
    std::uint64_t last_received_ns = 0;

    wirepool::Batch batch(64);
    const auto deadline = std::chrono::steady_clock::now() + seconds(30);
    while (received < wanted) {
        expect(std::chrono::steady_clock::now() < deadline,
               "received " + std::to_string(received) + " of " + std::to_string(wanted) +
                   " messages within 30 s");
        const std::size_t count = pool.poll(batch, milliseconds(200));
        ++polls;
        expect(count == batch.size(), "poll count matches batch size");
        expect(count <= batch.capacity(), "poll filled at most the batch capacity");
        for (const wirepool::MessageView &message : batch) {
            expect(message.channel == channels[0] || message.channel == channels[1],
                   "message on a subscribed channel, got \"" + std::string(message.channel) +
                       "\"");
            const std::optional<std::uint64_t> seq = parse_seq(message.payload);
            expect(seq.has_value(),
                   "payload has a \"seq\" number: " + shorten(message.payload));
            const auto previous = last_seq.find(message.channel);
            if (previous != last_seq.end()) {
                expect(*seq > previous->second,
                       std::string(message.channel) + ": seq " + std::to_string(*seq) +
                           " after " + std::to_string(previous->second) +
                           " (expected strictly increasing)");
                previous->second = *seq;
            } else {
                last_seq.emplace(std::string(message.channel), *seq);
            }
            expect(message.kind == static_cast<std::uint32_t>(WIREPOOL_MESSAGE_DATA),
                   "message kind is WIREPOOL_MESSAGE_DATA, got " + std::to_string(message.kind));
            const auto now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                    std::chrono::system_clock::now().time_since_epoch())
                                    .count();
            const auto skew_ns = now_ns - static_cast<std::int64_t>(message.received_ns);
            expect(skew_ns > -1'000'000'000LL && skew_ns < 60'000'000'000LL,
                   "received_ns " + std::to_string(message.received_ns) +
                       " is a recent CLOCK_REALTIME time (now " + std::to_string(now_ns) + ")");
            ++per_channel[std::string(message.channel)];
            ++per_connection[message.connection_id];
            if (first_received_ns == 0) {
                first_received_ns = message.received_ns;
            }
            last_received_ns = message.received_ns;
            ++received;
        }
    }
    expect(per_channel.size() == 2, "messages arrived on both channels");

    const std::string history =
        pool.request(R"({"op":"history","channel":"ticker.0","bars":3})", seconds(5), true);
    expect(history.find("\"bars\"") != std::string::npos,
           "history reply contains \"bars\": " + shorten(history));

    try {
        const std::string reply = pool.request(R"({"op":"fail"})", seconds(5));
        throw CheckFailed("request {\"op\":\"fail\"} returned instead of throwing: " +
                          shorten(reply));
    } catch (const wirepool::RemoteError &e) {
        expect(e.code() == wirepool::ErrorCode::Remote, "RemoteError carries the remote code");
        std::cout << "remote error: " << e.what() << "; payload " << shorten(e.payload())
                  << "\n";
    }

    // The two requests above, answered and refused by the venue, both count.
    const std::string latency = pool.request_latency_json();
    expect(latency.find("\"count\":2,") != std::string::npos,
           "request_latency_json() counts the two requests: " + latency);
    const std::string port_latency = http_get(*admin, "/api/v1/pool/latency");
    expect(port_latency.size() >= latency.size() &&
               port_latency.compare(port_latency.size() - latency.size(), latency.size(),
                                    latency) == 0,
           "GET /api/v1/pool/latency gives the same body: " + shorten(port_latency));
    std::cout << "request latency: " << latency << "\n";

    const std::string stats = pool.stats_json();
    expect(stats.find("\"ready_connections\"") != std::string::npos,
           "stats JSON has ready_connections: " + shorten(stats));

    // A connection the application distrusts (say its data looks stale) is replaced
    // make before break: data keeps flowing while the new one takes over.
    const std::uint64_t distrusted = per_connection.begin()->first;
    const std::uint64_t replacement = pool.recycle_connection(distrusted);
    expect(replacement != distrusted, "recycle_connection returns a new connection's id");
    const std::string connections = pool.connections_json();
    expect(connections.find("\"id\":" + std::to_string(replacement)) != std::string::npos,
           "the replacement is listed: " + shorten(connections));
    try {
        pool.close_connection(999999);
        throw CheckFailed("close_connection(999999) returned instead of throwing");
    } catch (const wirepool::Error &e) {
        expect(e.code() == wirepool::ErrorCode::InvalidArgument,
               std::string("an unknown connection is an invalid argument: ") + e.what());
        std::cout << "unknown connection: " << e.what() << "\n";
    }

    wirepool::PendingRequest unanswered = check_submit(pool);
    check_reconfigure(pool);

    pool.unsubscribe(channels[1]);
    const std::string latency_at_close = pool.request_latency_json();
    pool.close();
    expect(!pool.health_addr().has_value(), "close() stops the admin port: no address");
    try {
        (void)unanswered.wait(seconds(10));
        throw CheckFailed("a request unanswered at close() returned instead of throwing");
    } catch (const wirepool::ClosedError &) {
    }
    expect(pool.request_latency_json() == latency_at_close,
           "request latency still answers after close(), unchanged");
    // After close, poll drains what is queued and then reports ClosedError.
    bool closed = false;
    for (int drained = 0; drained < 10000 && !closed; ++drained) {
        try {
            pool.poll(batch, milliseconds(100));
        } catch (const wirepool::ClosedError &) {
            closed = true;
        }
    }
    expect(closed, "poll throws ClosedError after close() once the queue is drained");
    try {
        wirepool::SettingsChange change;
        change.min_connections = 1;
        pool.reconfigure(change);
        throw CheckFailed("reconfigure after close() returned instead of throwing");
    } catch (const wirepool::ClosedError &) {
    }

    std::ostringstream summary;
    summary << "ok: " << received << " messages in " << polls << " polls";
    for (const auto &[channel, count] : per_channel) {
        summary << ", " << channel << "=" << count << " (last seq " << last_seq[channel] << ")";
    }
    summary << ", " << per_connection.size() << " connection(s)";
    if (last_received_ns > first_received_ns) {
        summary << ", span " << (last_received_ns - first_received_ns) / 1000000 << " ms";
    }
    summary << "; history reply " << shorten(history, 80);
    std::cout << summary.str() << "\n";
    return 0;
}

} // namespace

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        std::cerr << "usage: " << argv[0] << " ws://HOST:PORT [MESSAGE_COUNT]\n";
        return 2;
    }
    std::size_t wanted = 200;
    if (argc == 3) {
        char *end = nullptr;
        const unsigned long long parsed = std::strtoull(argv[2], &end, 10);
        if (end == argv[2] || *end != '\0' || parsed == 0) {
            std::cerr << "MESSAGE_COUNT must be a positive integer, got \"" << argv[2] << "\"\n";
            return 2;
        }
        wanted = static_cast<std::size_t>(parsed);
    }
    try {
        return run(argv[1], wanted);
    } catch (const CheckFailed &e) {
        std::cerr << "FAILED: " << e.what() << "\n";
    } catch (const wirepool::Error &e) {
        std::cerr << "FAILED: wirepool error " << e.raw_code() << " ("
                  << wirepool::code_text(e.code()) << "): " << e.what() << "\n";
    } catch (const std::exception &e) {
        std::cerr << "FAILED: " << e.what() << "\n";
    }
    return 1;
}
