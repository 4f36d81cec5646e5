package io.github.pop3kafka.consumer;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.stream.Stream;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryEncoder;
import org.apache.avro.io.EncoderFactory;
import org.apache.avro.message.BinaryMessageEncoder;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.MethodSource;

/** The pure decoding logic, on records made here with every schema file of schemas/. */
class RecordDecoderTest {

  static SchemaCatalogue catalogue;

  @BeforeAll
  static void load() throws IOException {
    catalogue = SchemaCatalogue.load(schemaDir());
  }

  static Path schemaDir() {
    return Path.of(System.getProperty("pop3k.schemas", "../../schemas"));
  }

  static Stream<String> ourFiles() throws IOException {
    return SchemaCatalogue.load(schemaDir()).entries().stream()
        .filter(e -> !e.schema().getFullName().equals("io.pop3kafka.LedgerEntry"))
        .map(SchemaCatalogue.Entry::file);
  }

  static SchemaCatalogue.Entry entry(String file) {
    return catalogue.entries().stream().filter(e -> e.file().equals(file)).findFirst().orElseThrow();
  }

  /** A valid record of {@code schema}: defaults where the schema has them, else the least value. */
  static Object minimal(Schema schema) {
    switch (schema.getType()) {
      case RECORD: {
        GenericData.Record r = new GenericData.Record(schema);
        for (Schema.Field f : schema.getFields()) {
          r.put(f.pos(), f.hasDefaultValue() ? GenericData.get().getDefaultValue(f) : minimal(f.schema()));
        }
        return r;
      }
      case UNION:
        for (Schema s : schema.getTypes()) {
          if (s.getType() == Schema.Type.NULL) {
            return null;
          }
        }
        return minimal(schema.getTypes().get(0));
      case ARRAY:
        return new GenericData.Array<>(0, schema);
      case MAP:
        return new HashMap<String, Object>();
      case ENUM:
        return new GenericData.EnumSymbol(schema, schema.getEnumSymbols().get(0));
      case FIXED:
        return new GenericData.Fixed(schema, new byte[schema.getFixedSize()]);
      case STRING:
        return "s";
      case BYTES:
        return ByteBuffer.wrap(new byte[] {1, 2, 3});
      case INT:
        return 1;
      case LONG:
        return 1L;
      case FLOAT:
        return 1.0f;
      case DOUBLE:
        return 1.0;
      case BOOLEAN:
        return true;
      default:
        return null;
    }
  }

  static GenericData.Record sample(SchemaCatalogue.Entry e) {
    GenericData.Record r = (GenericData.Record) minimal(e.schema());
    r.put("record_id", "mbox:" + e.file());
    return r;
  }

  static byte[] body(Schema schema, GenericRecord r) throws IOException {
    ByteArrayOutputStream buf = new ByteArrayOutputStream();
    BinaryEncoder enc = EncoderFactory.get().binaryEncoder(buf, null);
    new GenericDatumWriter<GenericRecord>(schema).write(r, enc);
    enc.flush();
    return buf.toByteArray();
  }

  static byte[] registryFrame(int id, byte[] body) {
    return ByteBuffer.allocate(5 + body.length).put((byte) 0).putInt(id).put(body).array();
  }

  static byte[] singleObject(Schema schema, GenericRecord r) throws IOException {
    return new BinaryMessageEncoder<GenericRecord>(GenericData.get(), schema).encode(r).array();
  }

  @Test
  void catalogueHasEveryTypeOnceAsCurrentAndDistinctFingerprints() {
    assertTrue(catalogue.currentSchemas().keySet().containsAll(
        List.of("io.pop3kafka.MailRecord", "io.pop3kafka.DeadLetter", "io.pop3kafka.AttachmentChunk")));
    long distinct = catalogue.entries().stream().mapToLong(SchemaCatalogue.Entry::fingerprint).distinct().count();
    assertEquals(catalogue.entries().size(), distinct);
    assertTrue(catalogue.entries().stream().anyMatch(e -> e.file().startsWith("history/")));
  }

  @ParameterizedTest
  @MethodSource("ourFiles")
  void singleObjectOfEveryVersionIsReadAsTheCurrentSchema(String file) throws Exception {
    SchemaCatalogue.Entry e = entry(file);
    byte[] frame = singleObject(e.schema(), sample(e));
    assertEquals((byte) 0xC3, frame[0]);
    assertEquals((byte) 0x01, frame[1]);
    long fp = ByteBuffer.wrap(frame, 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
    assertEquals(e.fingerprint(), fp, "Avro's encoder writes the fingerprint we computed");

    RecordDecoder.Decoded d = new RecordDecoder(catalogue, null).decode(frame);
    assertEquals(RecordDecoder.Framing.SINGLE_OBJECT, d.framing());
    assertEquals(RecordDecoder.hex(Arrays.copyOfRange(frame, 2, 10), 8), d.fingerprint());
    assertEquals(file, d.writerFile());
    assertNull(d.schemaId());
    assertEquals("mbox:" + file, d.record().get("record_id").toString());
    Schema current = catalogue.current(e.schema().getFullName()).schema();
    assertEquals(current, d.record().getSchema(), "resolved into the current schema");
  }

  @ParameterizedTest
  @MethodSource("ourFiles")
  void registryFrameOfEveryVersionIsReadAsTheCurrentSchema(String file) throws Exception {
    SchemaCatalogue.Entry e = entry(file);
    AtomicInteger lookups = new AtomicInteger();
    RecordDecoder dec =
        new RecordDecoder(
            catalogue,
            id -> {
              lookups.incrementAndGet();
              assertEquals(70000 + 7, id);
              return new Schema.Parser().parse(e.schema().toString());
            });
    byte[] frame = registryFrame(70007, body(e.schema(), sample(e)));
    for (int i = 0; i < 3; i++) {
      RecordDecoder.Decoded d = dec.decode(frame);
      assertEquals(RecordDecoder.Framing.SCHEMA_REGISTRY, d.framing());
      assertEquals(70007, d.schemaId());
      assertNull(d.fingerprint());
      assertEquals(file, d.writerFile(), "the registry schema is recognised by canonical form");
      assertEquals("mbox:" + file, d.record().get("record_id").toString());
      assertEquals(catalogue.current(e.schema().getFullName()).schema(), d.record().getSchema());
    }
    assertEquals(1, lookups.get(), "one lookup per schema id");
  }

  @Test
  void unknownFingerprintIsAnErrorNamingIt() {
    byte[] frame = {(byte) 0xC3, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0};
    RecordDecoder.DecodeException e =
        assertThrows(RecordDecoder.DecodeException.class, () -> new RecordDecoder(catalogue, null).decode(frame));
    assertEquals("unknown_schema", e.code);
    assertTrue(e.getMessage().contains("0102030405060708"), e.getMessage());
  }

  @Test
  void registryFrameWithoutRegistryOrWithUnknownIdIsUnknownSchema() throws Exception {
    SchemaCatalogue.Entry mail = catalogue.current("io.pop3kafka.MailRecord");
    byte[] frame = registryFrame(5, body(mail.schema(), sample(mail)));
    RecordDecoder.DecodeException e =
        assertThrows(RecordDecoder.DecodeException.class, () -> new RecordDecoder(catalogue, null).decode(frame));
    assertEquals("unknown_schema", e.code);

    AtomicInteger lookups = new AtomicInteger();
    RecordDecoder dec =
        new RecordDecoder(
            catalogue,
            id -> {
              lookups.incrementAndGet();
              throw new RecordDecoder.DecodeException("unknown_schema", "schema id " + id + " is not in the registry");
            });
    for (int i = 0; i < 3; i++) {
      e = assertThrows(RecordDecoder.DecodeException.class, () -> dec.decode(frame));
      assertEquals("unknown_schema", e.code);
    }
    assertEquals(1, lookups.get(), "a definite 'no such id' is remembered");
  }

  @Test
  void registryOutageIsRetriedOnTheNextRecord() throws Exception {
    SchemaCatalogue.Entry mail = catalogue.current("io.pop3kafka.MailRecord");
    byte[] frame = registryFrame(9, body(mail.schema(), sample(mail)));
    AtomicInteger lookups = new AtomicInteger();
    RecordDecoder dec =
        new RecordDecoder(
            catalogue,
            id -> {
              if (lookups.incrementAndGet() == 1) {
                throw new IOException("connection refused");
              }
              return mail.schema();
            });
    RecordDecoder.DecodeException e = assertThrows(RecordDecoder.DecodeException.class, () -> dec.decode(frame));
    assertEquals("registry_unavailable", e.code);
    assertEquals("mbox:mail_record.avsc", dec.decode(frame).record().get("record_id").toString());
  }

  @Test
  void otherValuesAreNotOurs() throws Exception {
    RecordDecoder dec = new RecordDecoder(catalogue, id -> catalogue.current("io.pop3kafka.MailRecord").schema());
    for (byte[] v : List.of(new byte[0], "{\"json\": 1}".getBytes(), new byte[] {(byte) 0xC3, 1, 2}, new byte[] {0, 1})) {
      RecordDecoder.DecodeException e = assertThrows(RecordDecoder.DecodeException.class, () -> dec.decode(v));
      assertEquals("not_ours", e.code, Arrays.toString(v));
    }
    assertEquals("not_ours", assertThrows(RecordDecoder.DecodeException.class, () -> dec.decode(null)).code);
    SchemaCatalogue.Entry ledger = catalogue.current("io.pop3kafka.LedgerEntry");
    if (ledger != null) {
      byte[] frame = singleObject(ledger.schema(), (GenericRecord) minimal(ledger.schema()));
      RecordDecoder.DecodeException e = assertThrows(RecordDecoder.DecodeException.class, () -> dec.decode(frame));
      assertEquals("not_ours", e.code);
      assertTrue(e.getMessage().contains("LedgerEntry"));
    }
  }

  @Test
  void truncatedOrPaddedBodiesAreMalformed() throws Exception {
    SchemaCatalogue.Entry mail = catalogue.current("io.pop3kafka.MailRecord");
    byte[] body = body(mail.schema(), sample(mail));
    RecordDecoder dec = new RecordDecoder(catalogue, id -> mail.schema());
    byte[] padded = registryFrame(1, Arrays.copyOf(body, body.length + 3));
    assertEquals("malformed", assertThrows(RecordDecoder.DecodeException.class, () -> dec.decode(padded)).code);
    byte[] cut = registryFrame(1, Arrays.copyOf(body, body.length / 2));
    assertEquals("malformed", assertThrows(RecordDecoder.DecodeException.class, () -> dec.decode(cut)).code);
    byte[] so = singleObject(mail.schema(), sample(mail));
    byte[] soCut = Arrays.copyOf(so, 10 + (so.length - 10) / 2);
    assertEquals("malformed", assertThrows(RecordDecoder.DecodeException.class, () -> dec.decode(soCut)).code);
  }

  @Test
  void jsonLineOfAMailHasTheFieldsTheTestsCompare() throws Exception {
    SchemaCatalogue.Entry e = catalogue.current("io.pop3kafka.MailRecord");
    GenericData.Record r = sample(e);
    r.put("subject", "Grüße");
    Schema attSchema = e.schema().getField("attachments").schema().getElementType();
    List<GenericRecord> atts = new ArrayList<>();
    for (String name : List.of("a.pdf", "résumé.txt")) {
      GenericData.Record a = (GenericData.Record) minimal(attSchema);
      a.put("filename", name);
      atts.add(a);
    }
    r.put("attachments", new GenericData.Array<>(e.schema().getField("attachments").schema(), atts));
    Map<String, Object> f = RecordJson.fields(new RecordDecoder(catalogue, null).decode(singleObject(e.schema(), r)));
    assertEquals("single_object", f.get("framing"));
    assertEquals("mail", f.get("kind"));
    assertEquals("Grüße", f.get("subject"));
    assertEquals(List.of("a.pdf", "résumé.txt"), f.get("attachments"));
    assertEquals("mbox:mail_record.avsc", f.get("record_id"));
    assertFalse(f.containsKey("reason"));
  }

  @Test
  void fingerprintHexIsTheFrameByteOrder() {
    assertEquals("0807060504030201", SchemaCatalogue.Entry.fingerprintHex(0x0102030405060708L));
    assertArrayEquals(
        new byte[] {8, 7, 6, 5, 4, 3, 2, 1},
        ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN).putLong(0x0102030405060708L).array());
  }
}
